"""Data sets and readers that produce KeyedJaggedTensor batches."""

from jaxrec.data.synthetic import Batch, SyntheticClickData

__all__ = ["Batch", "SyntheticClickData"]
