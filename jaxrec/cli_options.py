"""Option checks of the ``jaxrec`` command: bad values end in one line and exit status 2.

Each ``type=`` function here turns the text of an option into its value or
raises :class:`argparse.ArgumentTypeError` with what the option accepts;
argparse then names the option. :class:`OneLineParser` prints that one line
(no usage block, no traceback) and exits with status 2. :func:`check_memory`
compares a size estimate with the memory available, before anything is
allocated.

>>> positive_int("3")
3
>>> positive_int("0")
Traceback (most recent call last):
...
argparse.ArgumentTypeError: expected a whole number >= 1, got '0'
>>> comma_list(["fp32", "fp16"])("fp16,fp32")
['fp16', 'fp32']
>>> human_bytes(3 * 2**30)
'3.0 GiB'
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from typing import NoReturn

__all__ = [
    "OneLineParser",
    "available_memory",
    "check_memory",
    "comma_list",
    "human_bytes",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "seed",
    "writable_path",
]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int(text: str, low: int, what: str, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (high is not None and value >= high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, sizes, counts)."""
    return _int(text, 1, "a whole number >= 1")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0, "a whole number >= 0")


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63)."""
    return _int(text, 0, "a whole number in [0, 2**63)", 2**63)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates).

    >>> positive_float("1e-3")
    0.001
    >>> positive_float("nan")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a finite number > 0, got 'nan'
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay).

    >>> non_negative_float("0")
    0.0
    >>> non_negative_float("-1e-4")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a finite number >= 0, got '-1e-4'
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def comma_list(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """A type for a comma-separated, non-empty list of names out of ``allowed``."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            what = f"unknown {unknown}" if unknown else "an empty list"
            raise argparse.ArgumentTypeError(
                f"{what}; expected a comma list of {', '.join(allowed)}"
            )
        return items

    parse.__name__ = "comma list"
    return parse


def writable_path(text: str) -> str:
    """A file path whose folder exists (checked before the run, not after it)."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist")
    return text


def human_bytes(n: float) -> str:
    """``n`` bytes in the largest unit that keeps the number >= 1."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def available_memory() -> tuple[int, str] | None:
    """``(bytes, where)``: free memory of the default device (GPU) or of the host.

    On a GPU, ``bytes_limit - bytes_in_use`` of the first device's memory stats;
    elsewhere the host's available memory (psutil when installed, else sysconf).
    None when it cannot be read.
    """
    import jax

    device = jax.devices()[0]
    if device.platform == "gpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), "GPU memory"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "host memory"
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory"
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(
    parser: argparse.ArgumentParser,
    needed: int,
    options: str,
    available: tuple[int, str] | None = None,
) -> None:
    """``parser.error`` naming ``options`` when ``needed`` bytes exceed the free memory."""
    available = available_memory() if available is None else available
    if available is None:
        return
    free, where = available
    if needed > free:
        parser.error(
            f"{options} need about {human_bytes(needed)}, more than the "
            f"{human_bytes(free)} of {where} available; choose smaller sizes"
        )
