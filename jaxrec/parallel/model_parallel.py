"""A model's embedding collections sharded over a mesh axis, the batch split across devices
(TorchRec's ``DistributedModelParallel``).

:class:`DistributedModelParallel` wraps a Flax model that contains
:class:`~jaxrec.EmbeddingBagCollection` / :class:`~jaxrec.EmbeddingCollection` submodules:

- **Plans.** Each collection gets a :class:`~jaxrec.parallel.ShardingPlan`: given, one per
  collection path (``"sparse_arch"``), or chosen by an
  :class:`~jaxrec.parallel.EmbeddingShardingPlanner`. The collections are found by tracing
  the model once on abstract values (``jax.eval_shape``), so submodules created inside a
  compact ``__call__`` are found too.
- **Variables.** The collections' tables live in the sharded layout of
  :mod:`jaxrec.parallel.convert` (each local group split by rows over the axis, data-parallel
  tables replicated); every other variable is replicated. They are ordinary ``jax.Array``\\ s
  with ``NamedSharding``\\ s: :meth:`init` creates them sharded (each device generates only
  the tables it holds, with the values one device would give), :meth:`place` shards
  single-device variables, :meth:`unshard` gathers them back.
- **Steps.** :meth:`apply` and :meth:`make_train_step` run the model inside
  ``jax.shard_map``: every device runs the model on its slice of the batch, each collection
  runs :func:`~jaxrec.parallel.sharded_lookup` (input all-to-all, lookups and fused updates
  on the owners, output all-to-all / reduce-scatter), and the dense gradients are summed over
  the axis before the optimizer, so a step equals the single-device step on the whole batch.
- **Batches.** Arguments are data-parallel: every leaf is the concatenation along its first
  axis of one slice per device (a KJT slice per device, all of one capacity and stride),
  as :meth:`shard_batch` builds them from per-device batches.
- **State dicts.** :meth:`state_dict` and :meth:`optimizer_state_dict` give whole per-table
  arrays with TorchRec's names (``sparse_arch.embedding_bags.t0.weight``) and the dense
  parameters under their module paths.

Several processes (``jax.distributed.initialize``) run the same program; each passes the
batches of its own devices to :meth:`shard_batch`, and the state dicts gather every shard.

>>> import jax, jax.numpy as jnp, numpy as np, optax
>>> from jax.sharding import Mesh
>>> import jaxrec
>>> from jaxrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
>>> from jaxrec.parallel import ShardingPlan, row_wise, table_wise
>>> tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=2, num_embeddings=6,
...                              feature_names=[f"f{i}"]) for i in range(2)]
>>> ebc = EmbeddingBagCollection(tables=tables,
...                              optimizer=jaxrec.optim.exact_sgd(learning_rate=0.5))
>>> dmp = DistributedModelParallel(ebc, Mesh(np.array(jax.devices()[:2]), ("x",)),
...                                plan=ShardingPlan({"t0": row_wise(), "t1": table_wise(1)}))
>>> kjt = lambda v, l: KeyedJaggedTensor(keys=["f0", "f1"], values=jnp.array(v),
...                                      lengths=jnp.array(l))
>>> batch = dmp.shard_batch([kjt([1, 5, 2], [2, 1]), kjt([0, 3, 4], [1, 2])])  # one bag a device
>>> variables = dmp.init(jax.random.key(0), batch)
>>> dmp.apply(variables, batch).values().shape   # both devices' bags
(2, 4)
>>> step = dmp.make_train_step(
...     lambda p, k: jnp.mean(ebc.apply({"params": p}, k).values()), jaxrec.optim.fused(optax.sgd(0.1)))
>>> params, opt_state, loss = step(variables["params"], dmp.init_optimizer(
...     jaxrec.optim.fused(optax.sgd(0.1)), variables["params"]), batch)
>>> sorted(dmp.state_dict({"params": params}))
['embedding_bags.t0.weight', 'embedding_bags.t1.weight']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.optim.fused import apply_updates
from jaxrec.parallel.collection_sharding import CollectionSharding, use_shardings
from jaxrec.parallel.convert import (
    TableState,
    partition_specs,
    shard_params,
    unshard_params,
    unshard_tables,
)
from jaxrec.parallel.layout import ShardedLayout
from jaxrec.parallel.planner import EmbeddingShardingPlanner
from jaxrec.parallel.sharded_lookup import checked_comm_dtype
from jaxrec.parallel.types import ShardingPlan

__all__ = ["DistributedModelParallel"]

Path = tuple[str, ...]


def _name(path: Path) -> str:
    return "/".join(path)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _get(tree: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


def _replace(tree: Mapping[str, Any], keys: Sequence[str], value: Any) -> dict[str, Any]:
    """A copy of nested dicts ``tree`` with the entry at ``keys`` replaced by ``value``."""
    if not keys:
        return value
    head, *rest = keys
    return {**tree, head: _replace(tree[head], rest, value)}


def _host(x: Any) -> np.ndarray:
    """A whole array on the host, gathered from every process when it spans several."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class DistributedModelParallel:
    """A Flax model whose embedding collections are sharded over one mesh axis.

    Args:
      module: a Flax module containing embedding collections (or a collection itself).
      mesh: a :class:`jax.sharding.Mesh`; the model runs over ``axis`` (the batch and the
        tables are split over its devices).
      plan: a :class:`ShardingPlan` (a model with one collection), a mapping from collection
        path (module names joined by ``"/"``, e.g. ``"sparse_arch"``; ``""`` for the root) to
        plans, or an :class:`EmbeddingShardingPlanner` (planned per collection, with each
        collection's fused optimizers) whose topology has the axis's device count.
      axis: the mesh axis (default: the mesh's only axis).
      ids_per_destination: the ids one device may send one device per step in a
        collection's input all-to-all: an int for every collection, or collection path →
        int; None (default): the exact bound, local capacity x the most shards of one table
        on a device, which moves mostly padding. Ids past it are dropped and counted as
        bad ids (FATAL raises); derive one with
        :func:`jaxrec.parallel.input_dist.destination_capacity`.
      comm_dtype: ``"bfloat16"`` or ``"float16"``: the pooled outputs of sharded tables
        and their gradients travel in 16 bits (TorchRec's quantized communication; half
        the bytes of the output and gradient distribution, rounded to 16 bits). None
        (default): in the lookup's dtype, equal to the single-device model.

    The collections are found on the first call that sees a batch (:meth:`init`,
    :meth:`place`); :attr:`plans` and :attr:`layouts` then hold what was chosen.
    """

    def __init__(
        self,
        module: nn.Module,
        mesh: Mesh,
        *,
        plan: ShardingPlan | Mapping[str, ShardingPlan] | EmbeddingShardingPlanner,
        axis: str | None = None,
        ids_per_destination: int | Mapping[str, int] | None = None,
        comm_dtype: str | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a Flax module, got {type(module).__name__}")
        if not isinstance(mesh, Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if axis is None:
            if len(mesh.axis_names) != 1:
                raise ValueError(
                    f"the mesh has axes {list(mesh.axis_names)}; name the one to shard over "
                    "with axis="
                )
            axis = mesh.axis_names[0]
        if axis not in mesh.axis_names:
            raise ValueError(f"axis {axis!r} is not an axis of the mesh {list(mesh.axis_names)}")
        if not isinstance(plan, ShardingPlan | Mapping | EmbeddingShardingPlanner):
            raise ValueError(
                "plan must be a ShardingPlan, a mapping of collection paths to plans, or an "
                f"EmbeddingShardingPlanner; got {type(plan).__name__}"
            )
        self.module, self.mesh, self.axis, self._plan = module, mesh, axis, plan
        self._ids_per_destination = ids_per_destination
        self.comm_dtype = checked_comm_dtype(comm_dtype)
        self.num_devices = int(mesh.shape[axis])
        self.shardings: dict[Path, CollectionSharding] = {}
        self.collections: dict[Path, nn.Module] = {}
        self._specs: Any = None
        self._steps: dict[Any, Callable] = {}

    # ---- configuration ------------------------------------------------------------------
    @property
    def plans(self) -> dict[str, ShardingPlan]:
        """The plan of each collection, by path (after the first :meth:`init` / :meth:`place`)."""
        return {_name(p): s.layout.plan for p, s in self.shardings.items()}

    @property
    def layouts(self) -> dict[str, ShardedLayout]:
        """The :class:`ShardedLayout` of each collection, by path."""
        return {_name(p): s.layout for p, s in self.shardings.items()}

    def _local_shapes(self, batch: Sequence[Any]) -> list[Any]:
        n = self.num_devices

        def local(x):
            shape = np.shape(x)
            if not shape or shape[0] % n:
                raise ValueError(
                    f"a batch leaf of shape {shape} does not split over the {n} devices of axis "
                    f"{self.axis!r}; every leaf holds one equal slice per device along its first "
                    "axis (see shard_batch)"
                )
            return jax.ShapeDtypeStruct((shape[0] // n, *shape[1:]), jax.numpy.result_type(x))

        return [jax.tree.map(local, b) for b in batch]

    def _configure(self, batch: Sequence[Any]) -> None:
        if self._specs is not None:
            return
        record: dict[Path, nn.Module] = {}
        with use_shardings({}, record=record):
            abstract = jax.eval_shape(
                self.module.init, jax.random.key(0), *self._local_shapes(batch)
            )
        if not record:
            raise ValueError(
                f"{type(self.module).__name__} calls no EmbeddingBagCollection or "
                "EmbeddingCollection; there is nothing to shard"
            )
        plans = self._plans_for(record)
        specs = jax.tree.map(lambda _: P(), abstract)
        for path, collection in record.items():
            layout = ShardedLayout.create(
                collection.tables,
                plans[path],
                self.num_devices,
                optimizer=collection.optimizer,
                table_optimizers=collection.table_optimizers,
            )
            self.shardings[path] = CollectionSharding(
                layout, self.axis, self._capacity_for(path, record), self.comm_dtype
            )
            keys = ("params", *path, collection.PARAMS_NAME)
            specs = _replace(specs, keys, partition_specs(layout, self.axis))
        dense = jax.tree.map(lambda _: True, specs["params"], is_leaf=_is_spec)
        for path, collection in record.items():
            keys = (*path, collection.PARAMS_NAME)
            dense = _replace(dense, keys, jax.tree.map(lambda _: False, _get(dense, keys)))
        self.collections = record
        self._specs, self._dense = specs, dense

    def _capacity_for(self, path: Path, record: Mapping[Path, nn.Module]) -> int | None:
        given = self._ids_per_destination
        if given is None or isinstance(given, int):
            return given
        names = sorted(_name(p) for p in record)
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(
                f"ids_per_destination names unknown collections {unknown} (collections: {names})"
            )
        return given.get(_name(path))

    def _plans_for(self, record: Mapping[Path, nn.Module]) -> dict[Path, ShardingPlan]:
        plan = self._plan
        if isinstance(plan, EmbeddingShardingPlanner):
            if plan.topology.num_devices != self.num_devices:
                raise ValueError(
                    f"the planner's topology has {plan.topology.num_devices} devices but mesh "
                    f"axis {self.axis!r} has {self.num_devices}"
                )
            return {
                path: plan.plan(
                    m.tables, optimizer=m.optimizer, table_optimizers=m.table_optimizers
                )
                for path, m in record.items()
            }
        if isinstance(plan, ShardingPlan):
            if len(record) != 1:
                raise ValueError(
                    f"the model has {len(record)} collections {[_name(p) for p in record]}; "
                    "give a plan per collection path"
                )
            return {next(iter(record)): plan}
        by_name = {_name(p): p for p in record}
        unknown = sorted(set(plan) - set(by_name))
        missing = sorted(set(by_name) - set(plan))
        if unknown or missing:
            raise ValueError(
                f"plans do not match the model's collections: no plan for {missing}, plans for "
                f"unknown collections {unknown} (collections: {sorted(by_name)})"
            )
        return {by_name[name]: ShardingPlan(dict(p)) for name, p in plan.items()}

    @property
    def variable_specs(self) -> Any:
        """The ``PartitionSpec`` of every variable (after the first :meth:`init` / :meth:`place`)."""
        if self._specs is None:
            raise ValueError("the model is not configured yet: call init or place with a batch")
        return self._specs

    def _shard_map(self, body: Callable, in_specs, out_specs) -> Callable:
        def traced(*args):
            with use_shardings(self.shardings):
                return body(*args)

        return jax.shard_map(
            traced, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    # ---- variables ----------------------------------------------------------------------
    def shard_batch(self, batches: Sequence[Any]) -> Any:
        """One batch per device of this process (mesh order) → the data-parallel batch.

        Every batch has the same pytree structure and leaf shapes (KJTs of one stride and
        capacity: pad with :func:`jaxrec.pad_to_capacity`). The result's leaves are global
        arrays split over the axis; with several processes each passes its own devices'.
        """
        local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        if len(batches) != len(local):
            raise ValueError(
                f"shard_batch takes one batch per device of this process on the mesh "
                f"({len(local)}), got {len(batches)}"
            )
        shapes = [[np.shape(x) for x in jax.tree.leaves(b)] for b in batches]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(
                "the per-device batches differ in leaf shapes "
                f"{[s for s in shapes if s != shapes[0]][0]} vs {shapes[0]}; pad every KJT to "
                "one capacity (jaxrec.pad_to_capacity)"
            )
        sharding = NamedSharding(self.mesh, P(self.axis))
        stacked = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *batches)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), stacked)

    def init(self, rng: jax.Array, *batch: Any) -> dict[str, Any]:
        """The model's variables, created sharded: each device generates the tables it holds,
        every table with the values ``module.init(rng, ...)`` gives on one device; dense
        variables replicated."""
        self._configure(batch)
        fn = self._shard_map(
            self.module.init,
            in_specs=(P(), *([P(self.axis)] * len(batch))),
            out_specs=self._specs,
        )
        return jax.jit(fn)(rng, *batch)

    def place(self, variables: Mapping[str, Any], *batch: Any) -> dict[str, Any]:
        """Single-device variables (of ``module.init``) → the sharded variables."""
        self._configure(batch)
        variables = dict(variables)
        for path, sharding in self.shardings.items():
            keys = ("params", *path, self.collections[path].PARAMS_NAME)
            variables = _replace(
                variables, keys, shard_params(sharding.layout, _get(variables, keys))
            )

        def put(x, spec):
            x = _host(x)
            sharding = NamedSharding(self.mesh, spec)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, variables, self._specs, is_leaf=lambda x: x is None)

    def unshard(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        """Sharded variables → the single-device variables (host arrays)."""
        self._require()
        out = jax.tree.map(_host, dict(variables))
        for path, sharding in self.shardings.items():
            keys = ("params", *path, self.collections[path].PARAMS_NAME)
            out = _replace(out, keys, unshard_params(sharding.layout, _get(out, keys)))
        return out

    def _require(self) -> None:
        if self._specs is None:
            raise ValueError("the model is not configured yet: call init or place with a batch")

    # ---- steps --------------------------------------------------------------------------
    def apply(self, variables: Mapping[str, Any], *batch: Any) -> Any:
        """``module.apply(variables, *batch)`` on every device's slice; outputs concatenated
        along their first axis (the batch)."""
        self._configure(batch)
        key = ("apply", len(batch))
        if key not in self._steps:
            fn = self._shard_map(
                self.module.apply,
                in_specs=(self._specs, *([P(self.axis)] * len(batch))),
                out_specs=P(self.axis),
            )
            self._steps[key] = jax.jit(fn)
        return self._steps[key](variables, *batch)

    def optimizer_specs(self, tx: optax.GradientTransformation, params: Any) -> Any:
        """The ``PartitionSpec`` of every leaf of ``tx``'s state: split over the axis where
        the state of one device's parameters is smaller than the state of the whole ones
        (state mirroring a sharded table), replicated elsewhere."""
        self._require()
        n = self.num_devices

        def local(x, spec):
            shape = tuple(np.shape(x))
            if spec and spec[0] == self.axis:
                shape = (shape[0] // n, *shape[1:])
            return jax.ShapeDtypeStruct(shape, jax.numpy.result_type(x))

        local_params = jax.tree.map(local, params, self._specs["params"])
        whole = jax.eval_shape(tx.init, params)
        part = jax.eval_shape(tx.init, local_params)

        def spec(w, p):
            if w.shape == p.shape:
                return P()
            if w.shape[1:] != p.shape[1:] or w.shape[0] != n * p.shape[0]:
                raise ValueError(
                    f"an optimizer state leaf of shape {w.shape} is {p.shape} for one device's "
                    "parameters, which is no split of its first axis"
                )
            return P(self.axis, *([None] * (len(w.shape) - 1)))

        return jax.tree.map(spec, whole, part)

    def init_optimizer(self, tx: optax.GradientTransformation, params: Any) -> Any:
        """``tx.init(params)`` on every device, sharded as the parameters it mirrors."""
        specs = self.optimizer_specs(tx, params)
        fn = self._shard_map(tx.init, in_specs=(self._specs["params"],), out_specs=specs)
        return jax.jit(fn)(params)

    def make_train_step(
        self,
        loss_fn: Callable[..., jax.Array],
        tx: optax.GradientTransformation,
        *,
        reduction: str = "mean",
        donate: bool = True,
    ) -> Callable:
        """A jitted ``step(params, opt_state, *batch) -> (params, opt_state, loss)``.

        ``loss_fn(params, *batch)`` runs on one device's slice (call ``module.apply`` in it)
        and returns the loss of that slice: its mean (``reduction="mean"``: the step
        minimises the mean over the whole batch) or its sum (``"sum"``). The dense
        gradients are summed over the axis; the fused tables are updated by their owners in
        the lookups' backward. ``tx`` is the optimizer of the dense params
        (``jaxrec.optim.fused(...)`` when tables are fused); transformations that look
        across leaves (global-norm clipping) see only the device's shards of plain tables.
        ``loss`` is the whole batch's.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self._require()
        axis, dense = self.axis, self._dense
        param_specs = self._specs["params"]

        def body(params, opt_state, *batch):
            scale = 1.0 / jax.lax.axis_size(axis) if reduction == "mean" else 1.0
            loss, grads = jax.value_and_grad(lambda p: loss_fn(p, *batch) * scale)(params)
            grads = jax.tree.map(
                lambda g, is_dense: jax.lax.psum(g, axis) if is_dense else g, grads, dense
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            return apply_updates(params, updates), opt_state, jax.lax.psum(loss, axis)

        state: dict[str, Any] = {}

        def step(params, opt_state, *batch):
            if "fn" not in state:
                specs = self.optimizer_specs(tx, params)
                fn = self._shard_map(
                    body,
                    in_specs=(param_specs, specs, *([P(axis)] * len(batch))),
                    out_specs=(param_specs, specs, P()),
                )
                state["fn"] = jax.jit(fn, donate_argnums=(0, 1) if donate else ())
            return state["fn"](params, opt_state, *batch)

        return step

    # ---- state dicts --------------------------------------------------------------------
    def _tables(self, variables: Mapping[str, Any]) -> dict[str, dict[str, TableState]]:
        self._require()
        out = {}
        for path, sharding in self.shardings.items():
            name = self.collections[path].PARAMS_NAME
            entry = jax.tree.map(_host, _get(variables, ("params", *path, name)))
            prefix = ".".join((*path, name))
            out[prefix] = unshard_tables(sharding.layout, entry)
        return out

    def state_dict(self, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Whole per-table weights with TorchRec's names (``<path>.embedding_bags.<table>.
        weight``) and every dense parameter under its module path (``dense_arch.Dense_0.
        kernel``), as host arrays."""
        out: dict[str, np.ndarray] = {}
        for prefix, tables in self._tables(variables).items():
            for table, state in tables.items():
                out[f"{prefix}.{table}.weight"] = state.weight
        dense_leaves = jax.tree_util.tree_leaves_with_path(
            jax.tree.map(
                lambda x, is_dense: x if is_dense else None,
                dict(variables["params"]),
                self._dense,
            )
        )
        for path, leaf in dense_leaves:
            out[".".join(str(getattr(k, "key", k)) for k in path)] = _host(leaf)
        return out

    def optimizer_state_dict(self, variables: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Per fused table its optimizer state, whole: ``{"<path>.embedding_bags.<table>.
        weight": {"momentum1": [rows], ..., "step": t}}`` (the collections' names)."""
        out: dict[str, dict[str, Any]] = {}
        for prefix, tables in self._tables(variables).items():
            for table, state in tables.items():
                if state.state is not None:
                    out[f"{prefix}.{table}.weight"] = {**state.state, "step": state.step}
        return out
