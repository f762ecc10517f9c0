"""The run's reusable dense buffers (``lorakit.ops.scratch``): lent as the shape asked, reused, bounded, and
never a difference in the merged result (a buffer comes back with the last module's values in it)."""

from __future__ import annotations

import threading

import torch

from lorakit.factors import LoraFactors
from lorakit.ops import merge_delta as D
from lorakit.ops.rank_rules import RankRule
from lorakit.ops.scratch import Scratch, dense


def test_a_returned_buffer_is_lent_again_and_a_larger_request_supersedes_smaller_ones():
    s = Scratch()
    with s.take((4, 5), torch.float32, "cpu") as a:
        assert a.shape == (4, 5) and a.is_contiguous()
        first = a.data_ptr()
    with s.take((2, 3), torch.float32, "cpu") as b:  # fits in the free one: the same memory
        assert b.shape == (2, 3) and b.data_ptr() == first
    with s.take((10, 10), torch.float32, "cpu") as c:  # fits in none: a new one, the small one dropped
        assert c.data_ptr() != first
    assert s.held_bytes == 100 * 4
    with s.take((3,), torch.float64, "cpu"):  # another dtype never shares
        pass
    assert s.held_bytes == 100 * 4 + 3 * 8


def test_buffers_lent_at_once_are_distinct_and_the_pool_holds_one_per_concurrent_user():
    s = Scratch()
    barrier = threading.Barrier(3)
    ptrs: list[int] = []

    def user() -> None:
        with s.take((1000,), torch.float32, "cpu") as b:
            ptrs.append(b.data_ptr())
            barrier.wait()

    threads = [threading.Thread(target=user) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ptrs)) == 3 and s.held_bytes == 3 * 4000
    for _ in range(5):  # one at a time afterwards: the same three, nothing more
        with s.take((1000,), torch.float32, "cpu"):
            pass
    assert s.held_bytes == 3 * 4000


def test_without_a_pool_dense_gives_a_fresh_tensor():
    with dense(None, (3, 4), torch.float32, "cpu") as a:
        assert a.shape == (3, 4)


def test_a_merge_into_a_reused_buffer_is_the_fresh_merge():
    g = torch.Generator().manual_seed(1)
    fs = [LoraFactors(B=torch.randn(90, 4, generator=g), A=torch.randn(4, 70, generator=g), scale=1.0) for _ in range(2)]
    s = Scratch()
    with s.take((200, 100), torch.float32, "cpu") as stale:
        stale.fill_(float("nan"))
    for method in ["ties", "dare_ties", "magnitude_prune"]:
        fresh = getattr(D, method)(fs, [1.0, 0.5], density=0.5, rank_rule=RankRule("rank", 4))
        reused = getattr(D, method)(fs, [1.0, 0.5], density=0.5, rank_rule=RankRule("rank", 4), scratch=s)
        assert torch.equal(fresh.factors.A, reused.factors.A) and torch.equal(fresh.factors.B, reused.factors.B)
        assert fresh.error == reused.error
    assert s.held_bytes == 200 * 100 * 4  # the one buffer, reused by every module
