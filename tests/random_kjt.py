"""Random flat KJTs for the kernel tests: ids, offsets with empty bags, repeated ids (small
tables), optional out-of-range ids, and padding poisoned with ids that must never be read."""

import numpy as np

PAD = 1 << 30  # padding ids: far outside every table, must never be read


def random_kjt(rng, num_kjt, batch, max_len, rows, bad_frac=0.0, pad=7):
    """``(ids [n + pad] int32, offsets [num_kjt * batch + 1] int32)``; a quarter of the bags
    empty, ``bad_frac`` of the real ids outside ``[0, rows)``, padding alternating ±PAD."""
    lengths = rng.integers(0, max_len + 1, num_kjt * batch)
    lengths[rng.random(lengths.shape) < 0.25] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    n = int(offsets[-1])
    ids = rng.integers(0, rows, n).astype(np.int32)
    bad = rng.random(n) < bad_frac
    ids[bad] = rng.choice([-1, rows, rows + 5, -(1 << 20)], int(bad.sum()))
    ids = np.concatenate([ids, np.where(np.arange(pad) % 2, PAD, -PAD)]).astype(np.int32)
    return ids, offsets
