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

from jaxrec.cli_options import (
    OneLineParser,
    check_memory,
    positive_float,
    positive_int,
    seed,
)
from jaxrec.train import BACKENDS, DATA_TYPES, EMBEDDING_OPTIMIZERS, TrainConfig, run_training

_SIZES = ("steps", "batch_size", "num_tables", "num_rows", "dim", "eval_batches", "log_every")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser("train", help="train a DLRM on synthetic click data")
    defaults = TrainConfig()
    for name in _SIZES:
        parser.add_argument(_flag(name), type=positive_int, default=getattr(defaults, name))
    for name in ("embedding_lr", "dense_lr"):
        parser.add_argument(_flag(name), type=positive_float, default=getattr(defaults, name))
    parser.add_argument("--seed", type=seed, default=defaults.seed)
    for name in ("bottom_mlp", "top_mlp"):
        parser.add_argument(
            _flag(name), type=positive_int, nargs="+", default=list(getattr(defaults, name))
        )
    for name, choices in (
        ("embedding_optimizer", sorted(EMBEDDING_OPTIMIZERS)),
        ("data_type", DATA_TYPES),
        ("backend", BACKENDS),
    ):
        parser.add_argument(_flag(name), choices=choices, default=getattr(defaults, name))
    return parser


def _train_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The run's config, or one line naming the bad option and exit status 2."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if values["top_mlp"][-1] != 1:
        parser.error(
            "argument --top-mlp: expected sizes ending in 1 (the click logit), got "
            + " ".join(map(str, values["top_mlp"]))
        )
    try:
        config = TrainConfig(**values)
    except ValueError as error:
        parser.error(str(error))
    check_memory(
        parser,
        config.estimated_bytes(),
        f"--num-tables {config.num_tables} --num-rows {config.num_rows} --dim {config.dim} "
        f"--batch-size {config.batch_size}",
    )
    return config


def train_main(config: TrainConfig) -> int:
    from tqdm.auto import tqdm

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
    parser = OneLineParser(prog="jaxrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = _train_parser(sub)
    sub.add_parser("bench", help="time the lookup kernels against their peers", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from jaxrec import bench

        return bench.main(rest)
    if rest:
        train_parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return train_main(_train_config(train_parser, args))


if __name__ == "__main__":
    sys.exit(main())
