"""The exact factor-space algebra, as the operator layer names it. It lives in the core layer, so that
:class:`~lorakit.adapter.Adapter`'s ``a + b`` and ``w * a`` use it without importing the operator layer: the factor
sums in :mod:`lorakit.algebra`, the adapter-level sum and whole-tensor merge in :mod:`lorakit.adapter`."""

from lorakit.adapter import cat, merge_full_tensors
from lorakit.algebra import bias_sum, cat_factors

__all__ = ["bias_sum", "cat", "cat_factors", "merge_full_tensors"]
