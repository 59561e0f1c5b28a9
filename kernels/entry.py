"""One entry point per kernel: the Pallas kernel or its XLA reference, same arguments.

A kernel module defines one public function that checks its arguments once and runs
``implementation="pallas"`` (the Triton kernel; ``interpret=True`` runs it on the CPU,
``config`` is its launch shape) or ``implementation="xla"`` (the plain-XLA reference, which
takes neither option). Its reference is published as ``<name>_reference``: the same function
with ``implementation="xla"`` bound (:func:`xla_reference`).

>>> def lookup(x, *, implementation="pallas", interpret=False, config=None):
...     check_implementation(implementation, interpret, config)
...     return implementation
>>> lookup_reference = xla_reference(lookup)
>>> lookup_reference.__name__, lookup_reference(1), lookup(1)
('lookup_reference', 'xla', 'pallas')
>>> lookup(1, implementation="cuda")
Traceback (most recent call last):
ValueError: implementation must be one of ('pallas', 'xla'), got 'cuda'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["IMPLEMENTATIONS", "Implementation", "check_implementation", "xla_reference"]

Implementation = Literal["pallas", "xla"]
"""Which path runs an operation: the Pallas kernel or its XLA reference."""

IMPLEMENTATIONS: tuple[Implementation, ...] = ("pallas", "xla")


def check_implementation(implementation: str, interpret: bool, config: Any) -> None:
    """Refuse an unknown ``implementation``, and kernel options given to the XLA reference.

    >>> check_implementation("xla", False, None)
    >>> check_implementation("xla", True, None)
    Traceback (most recent call last):
    ValueError: interpret and config are options of the Pallas kernel; the XLA reference takes neither (got interpret=True, config=None)
    """  # noqa: E501
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "xla" and (interpret or config is not None):
        raise ValueError(
            "interpret and config are options of the Pallas kernel; the XLA reference takes "
            f"neither (got interpret={interpret!r}, config={config!r})"
        )


def xla_reference(entry: Callable) -> Callable:
    """``entry`` with ``implementation="xla"`` bound, named ``<entry>_reference``."""
    reference = functools.partial(entry, implementation="xla")
    reference.__name__ = reference.__qualname__ = f"{entry.__name__}_reference"
    reference.__module__ = entry.__module__
    reference.__doc__ = (
        f':func:`{entry.__name__}` with ``implementation="xla"``: the plain-XLA reference '
        "(same arguments, without ``interpret`` and ``config``)."
    )
    return reference
