"""Data sets and readers that produce KeyedJaggedTensor batches.

Every reader yields :class:`Batch` objects (dense features, KJT, labels, example weights) of one
static stride; :func:`prefetch` builds them in a background thread.
"""

from jaxrec.data.batching import Prefetch, make_batch, prefetch, ragged_gather
from jaxrec.data.criteo import CriteoTSV
from jaxrec.data.movielens import MovieLens100K, load_movielens_100k
from jaxrec.data.synthetic import Batch, SyntheticClickData

__all__ = [
    "Batch",
    "CriteoTSV",
    "MovieLens100K",
    "Prefetch",
    "SyntheticClickData",
    "load_movielens_100k",
    "make_batch",
    "prefetch",
    "ragged_gather",
]
