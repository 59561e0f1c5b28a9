"""``curves.png`` (training loss, held-out AUC / recall@k against the planted AUC) and
``metrics.json`` of a run, in its ``out`` folder."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


def plot_curves(result: Any, path: str, top_k: int = 10) -> None:
    """Two panels: training loss and held-out loss per step; held-out AUC (and recall@k for
    a two-tower run) with the planted model's AUC as a dashed line when known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(result.loss_steps, result.losses, label="training loss")
    left.plot(result.eval_steps, [e["loss"] for e in result.evals], "o-", label="held-out loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend()
    right.plot(result.eval_steps, [e["auc"] for e in result.evals], "o-", label="held-out AUC")
    recall = f"recall@{top_k}"
    if result.evals and recall in result.evals[0]:
        right.plot(result.eval_steps, [e[recall] for e in result.evals], "s-", label=recall)
    if result.planted_auc is not None:
        right.axhline(result.planted_auc, ls="--", c="gray", label="planted model's AUC")
    right.set_xlabel("step")
    right.legend()
    fig.suptitle(result.description, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: Any, config: Any) -> dict[str, str]:
    """Write ``curves.png`` and ``metrics.json`` into ``config.out``; their paths."""
    os.makedirs(config.out, exist_ok=True)
    paths = {
        "curves": os.path.join(config.out, "curves.png"),
        "metrics": os.path.join(config.out, "metrics.json"),
    }
    plot_curves(result, paths["curves"], config.top_k)
    fields = {
        f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "state"
    }
    with open(paths["metrics"], "w") as f:
        json.dump({"config": dataclasses.asdict(config), **fields}, f, indent=1)
    return paths
