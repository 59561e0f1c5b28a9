import pytest
from jaxrec_kernels.pooled_lookup import pooled_lookup_reference
from jaxrec_kernels.sequence_lookup import sequence_lookup
from jaxrec_kernels.sparse_update import fused_sparse_update_reference
from jaxrec_kernels.weight_gradient import weight_gradient

from jaxrec.ops.backend import (
    AUTO_ON_GPU,
    Backend,
    BoundsCheckMode,
    as_bounds_check_mode,
    kernel,
    resolve_backend,
)


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


@pytest.mark.parametrize("operation", ["pooled", "sequence", "update", "weight_gradient"])
def test_auto_takes_the_measured_choice_of_each_operation_on_gpu(monkeypatch, operation):
    monkeypatch.setattr("jax.default_backend", lambda: "gpu")
    assert resolve_backend("auto", operation) == Backend(AUTO_ON_GPU[operation], False)
    monkeypatch.setattr("jax.default_backend", lambda: "cpu")
    assert resolve_backend("auto", operation) == Backend("xla", False)


def test_sequence_lookups_run_the_kernel_on_gpu_as_measured(monkeypatch):
    monkeypatch.setattr("jax.default_backend", lambda: "gpu")
    assert resolve_backend("auto", "sequence").name == "pallas"


def test_unknown_operation_is_refused():
    with pytest.raises(ValueError, match="operation must be one of"):
        resolve_backend("auto", "gather")


def test_kernel_hands_out_the_reference_or_the_interpreted_kernel():
    assert kernel("pooled", Backend("xla", False)) is pooled_lookup_reference
    assert kernel("update", Backend("xla", False)) is fused_sparse_update_reference
    pallas = kernel("weight_gradient", Backend("pallas", True))
    assert pallas.func is weight_gradient
    assert pallas.keywords == {"interpret": True}
    assert kernel("sequence", Backend("pallas", False)).func is sequence_lookup
