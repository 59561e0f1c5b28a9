"""``reshard.move`` against a NumPy replay of its copy list, on random placements over 1,
2 and 8 devices: uneven pieces (gather and scatter), even pieces (slices), column pieces,
1-D arrays, replicated sources and destinations, and a cast between dtypes."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.checkpoint.geometry import Copy
from jaxrec.checkpoint.reshard import ArraySpec, move


def _mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("x",))


def _place(blocks, mesh, replicated):
    """``[n, rows, cols]`` NumPy blocks (or one block when replicated) as a row-split array."""
    if replicated:
        return jax.device_put(blocks, NamedSharding(mesh, P()))
    whole = blocks.reshape((-1,) + blocks.shape[2:])
    return jax.device_put(whole, NamedSharding(mesh, P("x")))


def _replay(copies, sources, targets, n, replicated_sources):
    """The expected ``[n, rows, cols]`` (or replicated ``[rows, cols]``) of every target."""
    out = {}
    for name, t in targets.items():
        shape = (t.rows, t.cols) if t.replicated else (n, t.rows, t.cols)
        out[name] = np.zeros(shape, t.dtype)
    for c in copies:
        src = sources[c.src]
        block = src if c.src in replicated_sources else src[c.src_rank]
        block = block[:, None] if block.ndim == 1 else block
        piece = block[c.src_row : c.src_row + c.rows, c.src_col : c.src_col + c.cols]
        dst = out[c.dst] if targets[c.dst].replicated else out[c.dst][c.dst_rank]
        dst[c.dst_row : c.dst_row + c.rows, c.dst_col : c.dst_col + c.cols] = piece
    for name, t in targets.items():
        if t.ndim == 1:
            out[name] = out[name][..., 0]
    return out


def _random_case(rng, n):
    sources, src_shapes, replicated = {}, {}, set()
    for i in range(3):
        rows, cols = int(rng.integers(1, 40)), int(rng.integers(1, 6))
        name = f"s{i}"
        if i == 2:  # a replicated source (a data-parallel table's rows)
            sources[name] = rng.standard_normal((rows, cols)).astype(np.float32)
            replicated.add(name)
        else:
            sources[name] = rng.standard_normal((n, rows, cols)).astype(np.float32)
        src_shapes[name] = (rows, cols)
    sources["v"] = rng.standard_normal((n, 30)).astype(np.float32)  # 1-D per rank
    src_shapes["v"] = (30, 1)
    targets = {
        "a": ArraySpec(int(rng.integers(5, 50)), 5, "float32"),
        "b": ArraySpec(int(rng.integers(5, 50)), 3, "bfloat16"),
        "w": ArraySpec(int(rng.integers(5, 50)), 1, "float32", ndim=1),
        "r": ArraySpec(int(rng.integers(5, 30)), 4, "float32", replicated=True),
    }
    copies = []
    for name, t in targets.items():
        dst_ranks = [0] if t.replicated else range(n)
        for d in dst_ranks:
            row = 0
            while row < t.rows:
                src = rng.choice(sorted(src_shapes))
                s_rows, s_cols = src_shapes[src]
                rows = int(rng.integers(1, min(s_rows, t.rows - row) + 1))
                cols = int(rng.integers(1, min(s_cols, t.cols) + 1))
                src_col = int(rng.integers(0, s_cols - cols + 1))
                dst_col = int(rng.integers(0, t.cols - cols + 1))
                src_row = int(rng.integers(0, s_rows - rows + 1))
                src_rank = int(rng.integers(0, n))
                if rng.random() < 0.8:  # some rows stay zero
                    for dd in range(n) if t.replicated else [d]:
                        copies.append(
                            Copy(
                                src, src_rank, src_row, src_col, name, dd, row, dst_col, rows, cols
                            )
                        )
                row += rows
    return sources, targets, copies, frozenset(replicated)


def _check(sources, targets, copies, replicated, n):
    mesh = _mesh(n)
    placed = {k: _place(v, mesh, k in replicated) for k, v in sources.items()}
    got = move(tuple(copies), placed, targets, mesh, "x", replicated)
    want = _replay(copies, sources, targets, n, replicated)
    for name, t in targets.items():
        g = np.asarray(got[name]).astype(np.float32)
        w = want[name].astype(np.float32)
        if not t.replicated:
            g = g.reshape(w.shape)
        np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_copies_match_a_numpy_replay(n, seed):
    _check(*_random_case(np.random.default_rng(seed + 10 * n), n), n)


@pytest.mark.parametrize("shift", [0, 1, 3])
def test_even_blocks_move_as_slices_to_the_rank_shift_places_away(shift):
    """Every rank sends the same rows: the slice path, one ppermute per shift."""
    n, rows = 8, 6
    rng = np.random.default_rng(shift)
    sources = {"s": rng.standard_normal((n, 10, 4)).astype(np.float32)}
    targets = {"t": ArraySpec(rows, 4, "float32")}
    copies = [Copy("s", r, 3, 0, "t", (r + shift) % n, 0, 0, rows, 4) for r in range(n)]
    _check(sources, targets, copies, frozenset(), n)


def test_a_rank_that_sends_nothing_leaves_its_receiver_untouched():
    """Only ranks 0 and 5 send at shift 2; ranks 2 and 7 receive, the rest stay zero."""
    n = 8
    rng = np.random.default_rng(7)
    sources = {"s": rng.standard_normal((n, 10, 2)).astype(np.float32)}
    targets = {"t": ArraySpec(4, 2, "float32")}
    copies = [Copy("s", 0, 1, 0, "t", 2, 0, 0, 4, 2), Copy("s", 5, 0, 0, "t", 7, 1, 0, 3, 2)]
    _check(sources, targets, copies, frozenset(), n)
