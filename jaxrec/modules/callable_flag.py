"""A boolean module field that can also be called, as TorchRec's accessors are.

TorchRec passes ``is_weighted`` (EBC) and ``need_indices`` (EC) to the
constructor and reads them back with ``ebc.is_weighted()``. A Flax module is a
dataclass, so one name cannot be both a field and a method; the field's value
is wrapped in a flag that behaves as the bool and returns it when called.

>>> flag = CallableFlag(True, "is_weighted")
>>> flag(), bool(flag), flag == True
(True, True, True)
"""

from __future__ import annotations


class CallableFlag:
    __slots__ = ("_value", "_name")

    def __init__(self, value: object, name: str) -> None:
        if not isinstance(value, bool | int) or value not in (0, 1):
            raise ValueError(f"{name} must be a bool, got {value!r}")
        self._value = bool(value)
        self._name = name

    def __call__(self) -> bool:
        return self._value

    def __bool__(self) -> bool:
        return self._value

    def __eq__(self, other: object) -> bool:
        return self._value == bool(other)

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return repr(self._value)
