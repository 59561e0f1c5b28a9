"""The ``jaxrec`` command: ``jaxrec train`` and ``jaxrec bench``.

``jaxrec train`` trains a DLRM on the built-in synthetic click data with a
fused row-wise Adagrad for the tables and Adam for the dense layers, shows a
progress bar with the running loss and accuracy, and reports held-out loss
and AUC. ``jaxrec bench`` times the lookup kernels against their peers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from jaxrec.train import EMBEDDING_OPTIMIZERS, TrainConfig, run_training


def _train_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train a DLRM on synthetic click data")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(value))
        elif f.name == "embedding_optimizer":
            parser.add_argument(flag, choices=sorted(EMBEDDING_OPTIMIZERS), default=value)
        elif f.name == "data_type":
            parser.add_argument(flag, choices=["FP32", "FP16", "BF16"], default=value)
        elif f.name == "backend":
            parser.add_argument(flag, choices=["auto", "pallas", "xla"], default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)


def train_main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    config = TrainConfig(**values)
    print(
        f"DLRM on synthetic clicks: {config.num_tables} tables x {config.num_rows} rows x "
        f"dim {config.dim} ({config.data_type}), batch {config.batch_size}, "
        f"{config.embedding_optimizer} (lr {config.embedding_lr}) fused into the backward"
    )
    with tqdm(total=config.steps, unit="step", dynamic_ncols=True) as bar:
        last = 0

        def progress(step: int, metrics: dict[str, float]) -> None:
            nonlocal last
            bar.update(step - last)
            last = step
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}")

        result = run_training(config, progress)
    k = max(1, len(result.losses) // 5)
    early, late = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
    print(f"train loss: first {k} logs {early:.4f} -> last {k} logs {late:.4f}")
    print(f"held-out: loss {result.eval_loss:.4f}, AUC {result.eval_auc:.4f}")
    print(f"throughput: {result.examples_per_second:,.0f} examples/s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sub.add_parser("bench", help="time the lookup kernels against their peers", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from jaxrec import bench

        return bench.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
