"""The float64 dense references live in :mod:`benchmarks.merge_reference` (shared with the merge-quality
benchmark); re-exported here for the tests."""

from benchmarks.merge_reference import (
    _disjoint,
    breadcrumbs,
    core_space,
    iso_c,
    iso_cts,
    knots,
    magnitude_prune,
    svd_truncate,
    task_arithmetic,
    ties,
    top_k_mask,
    tsv,
)

__all__ = ['_disjoint', 'breadcrumbs', 'core_space', 'iso_c', 'iso_cts', 'knots', 'magnitude_prune', 'svd_truncate', 'task_arithmetic', 'ties', 'top_k_mask', 'tsv']
