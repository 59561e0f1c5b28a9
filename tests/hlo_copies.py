"""Read compiled HLO for copies of table-sized buffers (the in-place step tests)."""

import re

_COPY = re.compile(r"=\s*[a-z0-9]+(\[[0-9,]*\])\S*\s+copy(?:-start)?\(")


def table_copies(hlo_text: str, shapes: set[str]) -> list[str]:
    """The copy / copy-start instructions of compiled HLO whose result has one of ``shapes``."""
    return [
        line.strip()
        for line in hlo_text.splitlines()
        if (match := _COPY.search(line)) and match.group(1) in shapes
    ]


def shape_strings(*arrays) -> set[str]:
    """HLO shape strings (``[R,D]``, ``[R]``) of ``arrays``."""
    return {"[" + ",".join(map(str, a.shape)) + "]" for a in arrays}
