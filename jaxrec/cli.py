"""The ``jaxrec`` command: ``jaxrec train`` and ``jaxrec bench``.

``jaxrec train`` trains a DLRM, DCN-v2 or two-tower model on the built-in synthetic clicks,
MovieLens-100K or a Criteo TSV file (fused sparse optimizer for the tables, Adam for the dense
layers), shows a progress bar with examples/s and the running loss, evaluates every
``--eval-every`` steps, and ends with a table of held-out metrics (beside the planted model's
AUC on synthetic data). ``jaxrec bench`` times the lookup kernels against their peers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from jaxrec.cli_options import (
    OneLineParser,
    check_memory,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
)
from jaxrec.train import (
    BACKENDS,
    DATA_DEFAULTS,
    DATA_TYPES,
    DATASETS,
    EMBEDDING_OPTIMIZERS,
    HELP,
    LR_SCHEDULES,
    MODELS,
    TrainConfig,
    run_training,
)

_SIZES = (
    "steps",
    "batch_size",
    "num_tables",
    "num_rows",
    "dim",
    "eval_batches",
    "eval_every",
    "log_every",
    "cross_layers",
    "low_rank",
    "top_k",
)
_EPILOG = """examples:
  jaxrec train                                   DLRM on the built-in synthetic clicks
  jaxrec train --data movielens                  DCN-v2 on MovieLens-100K (its defaults)
  jaxrec train --data criteo train.txt --num-rows 100000
  jaxrec train --out run --checkpoint-dir run/ckpt --checkpoint-every 200
  jaxrec train --checkpoint-dir run/ckpt --resume   continue where it stopped"""


def _epilog() -> str:
    """The examples, then the defaults each data set brings (flags given still win)."""
    lines = [_EPILOG, "", "defaults that --data KIND brings (a flag given wins):"]
    for kind, values in DATA_DEFAULTS.items():
        flags = " ".join(
            _flag(k) if v is True else f"--no-{k.replace('_', '-')}" if v is False
            else f"{_flag(k)} {v}"
            for k, v in values.items()
        )  # fmt: skip
        lines.append(f"  {kind}: {flags}")
    return "\n".join(lines)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(name: str, default: object) -> str:
    return f"{HELP[name]} (default: {default})"


def _train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train",
        help="train a DLRM, DCN-v2 or two-tower model on synthetic, MovieLens or Criteo data",
        description=__doc__.split("\n\n")[1].replace("\n", " ").replace("``", ""),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = TrainConfig()
    parser.add_argument(
        "--model", choices=MODELS, default=defaults.model, help=_help("model", defaults.model)
    )
    parser.add_argument(
        "--data",
        nargs="+",
        metavar=("KIND", "PATH"),
        default=[defaults.data],
        help=_help("data", defaults.data) + "; KIND PATH also sets --data-path",
    )
    parser.add_argument("--data-path", default=None, metavar="PATH", help=HELP["data_path"])
    for name in _SIZES:
        parser.add_argument(
            _flag(name),
            type=positive_int,
            default=getattr(defaults, name),
            metavar="N",
            help=_help(name, getattr(defaults, name)),
        )
    for name in ("embedding_lr", "dense_lr"):
        parser.add_argument(
            _flag(name),
            type=positive_float,
            default=getattr(defaults, name),
            metavar="LR",
            help=_help(name, getattr(defaults, name)),
        )
    parser.add_argument(
        "--embedding-weight-decay",
        type=non_negative_float,
        default=defaults.embedding_weight_decay,
        metavar="WD",
        help=_help("embedding_weight_decay", defaults.embedding_weight_decay),
    )
    parser.add_argument("--seed", type=seed, default=defaults.seed, help=_help("seed", 0))
    for name in ("bottom_mlp", "top_mlp", "tower_mlp"):
        value = getattr(defaults, name)
        parser.add_argument(
            _flag(name),
            type=positive_int,
            nargs="+",
            default=list(value),
            metavar="W",
            help=_help(name, " ".join(map(str, value))),
        )
    for name, choices in (
        ("embedding_optimizer", sorted(EMBEDDING_OPTIMIZERS)),
        ("data_type", DATA_TYPES),
        ("backend", BACKENDS),
        ("lr_schedule", LR_SCHEDULES),
    ):
        parser.add_argument(
            _flag(name),
            choices=choices,
            default=getattr(defaults, name),
            help=_help(name, getattr(defaults, name)),
        )
    for name in ("rating_stats", "user_history"):
        parser.add_argument(
            _flag(name),
            action=argparse.BooleanOptionalAction,
            default=getattr(defaults, name),
            help=_help(name, getattr(defaults, name)),
        )
    parser.add_argument(
        "--ema-decay",
        type=non_negative_float,
        default=defaults.ema_decay,
        metavar="DECAY",
        help=_help("ema_decay", defaults.ema_decay),
    )
    parser.add_argument("--out", metavar="DIR", default=None, help=HELP["out"])
    parser.add_argument(
        "--checkpoint-dir", metavar="DIR", default=None, help=HELP["checkpoint_dir"]
    )
    parser.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=defaults.checkpoint_every,
        metavar="N",
        help=_help("checkpoint_every", defaults.checkpoint_every),
    )
    parser.add_argument("--resume", action="store_true", help=HELP["resume"])
    return parser


def _train_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The run's config, or one line naming the bad option and exit status 2."""
    data = list(args.data)
    if len(data) > 2 or data[0] not in DATASETS:
        parser.error(
            f"argument --data: expected one of {', '.join(DATASETS)} and an optional path, "
            f"got {' '.join(data)}"
        )
    if len(data) == 2:
        if args.data_path is not None and args.data_path != data[1]:
            parser.error(f"argument --data: two paths given ({data[1]} and {args.data_path})")
        args.data_path = data[1]
    args.data = data[0]
    if args.data_path is not None and not os.path.exists(args.data_path):
        parser.error(f"argument --data: {args.data_path} does not exist")
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
    if config.data == "synthetic":
        check_memory(
            parser,
            config.estimated_bytes(),
            f"--num-tables {config.num_tables} --num-rows {config.num_rows} --dim {config.dim} "
            f"--batch-size {config.batch_size}",
        )
    return config


def metrics_table(result) -> str:
    """The final held-out metrics as an aligned two-column table (planted AUC beside AUC)."""
    rows = [(name, f"{value:.4f}") for name, value in result.final.items()]
    if result.planted_auc is not None:
        gap = result.planted_auc - result.eval_auc
        rows.insert(
            1, ("planted AUC", f"{result.planted_auc:.4f}  (best reachable; gap {gap:.4f})")
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"{'held-out metric':<{width}}  value", f"{'-' * width}  -----"]
    return "\n".join([*lines, *(f"{name:<{width}}  {value}" for name, value in rows)])


def train_main(config: TrainConfig) -> int:
    from tqdm.auto import tqdm

    if config.resume:
        print(f"resuming from the latest checkpoint in {config.checkpoint_dir}")
    print(
        f"{config.model} on {config.data}: dim {config.dim} ({config.data_type}), batch "
        f"{config.batch_size}, {config.embedding_optimizer} (lr {config.embedding_lr}) fused "
        f"into the backward, Adam (lr {config.dense_lr}) on the dense layers"
    )
    with tqdm(total=config.steps, unit="step", dynamic_ncols=True) as bar:

        def progress(step: int, values: dict[str, float]) -> None:
            if bar.n == 0 and step > 1:
                bar.update(step - 1 - (step - 1) % config.log_every)
            if "loss" in values:
                bar.update(step - bar.n)
                bar.set_postfix(
                    loss=f"{values['loss']:.4f}", ex_per_s=f"{values['examples_per_s']:,.0f}"
                )
            else:
                shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in values.items())
                bar.write(f"step {step}: held-out {shown}")

        result = run_training(config, progress)
    print(result.description)
    print(metrics_table(result))
    print(f"throughput: {result.examples_per_second:,.0f} examples/s")
    if config.out:
        print(f"curves: {os.path.join(config.out, 'curves.png')}")
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
    kind = args.data[0] if args.data else None
    if kind in DATA_DEFAULTS:  # the data's defaults; flags given on the command line win
        train_parser.set_defaults(
            **{k: list(v) if isinstance(v, tuple) else v for k, v in DATA_DEFAULTS[kind].items()}
        )
        args = parser.parse_args(argv)
    return train_main(_train_config(train_parser, args))


if __name__ == "__main__":
    sys.exit(main())
