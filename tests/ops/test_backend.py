import pytest

from jaxrec.ops.backend import Backend, BoundsCheckMode, as_bounds_check_mode, resolve_backend


def test_auto_is_xla_on_cpu_and_pallas_is_interpreted_there():
    assert resolve_backend("auto") == Backend("xla", False)
    assert resolve_backend("pallas") == Backend("pallas", True)
    assert resolve_backend("xla") == Backend("xla", False)


def test_auto_is_pallas_compiled_on_gpu(monkeypatch):
    monkeypatch.setattr("jax.default_backend", lambda: "gpu")
    assert resolve_backend("auto") == Backend("pallas", False)
    assert resolve_backend("xla") == Backend("xla", False)


def test_unknown_backend_and_bounds_mode_are_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda")
    with pytest.raises(ValueError, match="bounds_check_mode must be one of"):
        as_bounds_check_mode("strict")
    assert as_bounds_check_mode("FATAL") is BoundsCheckMode.FATAL
