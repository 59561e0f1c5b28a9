"""Quantized inference collections (TorchRec's ``torchrec.quant``).

>>> from jaxrec import quant
>>> quant.EmbeddingBagCollection.__name__, quant.QUANT_DATA_TYPES
('EmbeddingBagCollection', ('INT8', 'INT4', 'INT2', 'FP16'))
"""

from jaxrec.quant.embedding_modules import QUANT_DATA_TYPES, EmbeddingBagCollection

__all__ = ["QUANT_DATA_TYPES", "EmbeddingBagCollection"]
