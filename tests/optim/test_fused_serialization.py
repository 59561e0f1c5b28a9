"""FusedTableParams round-trips through flax.serialization and orbax."""

from __future__ import annotations

import chex
import flax.serialization
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrec.optim import sparse_optimizers as so
from jaxrec.optim.fused import FusedTableParams, init_fused_table


def _params(seed):
    rng = np.random.default_rng(seed)
    table = init_fused_table(jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), so.adam())
    table = FusedTableParams(
        weight=table.weight,
        state={k: v + seed for k, v in table.state.items()},
        step=table.step + seed,
        uses=table.uses.at[1].set(seed),
    )
    return {"dense": jnp.full(2, float(seed)), "ebc": {"group_0": table}}


def test_flax_state_dict_round_trip():
    params = _params(3)
    state = flax.serialization.to_state_dict(params)
    assert set(state["ebc"]["group_0"]) == {"weight", "state", "step", "uses"}
    restored = flax.serialization.from_state_dict(_params(0), state)
    assert isinstance(restored["ebc"]["group_0"], FusedTableParams)
    chex.assert_trees_all_equal(restored, params)
    from_bytes = flax.serialization.from_bytes(_params(0), flax.serialization.to_bytes(params))
    chex.assert_trees_all_equal(from_bytes, params)


def test_orbax_save_restore_round_trip(tmp_path):
    params = _params(2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", params)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", _params(0))
    assert isinstance(restored["ebc"]["group_0"], FusedTableParams)
    chex.assert_trees_all_equal(restored, params)
