"""LQ-LoRA: the alternation, its stopping rule, the ILP budget and the written files."""

from __future__ import annotations

import itertools

import pytest
import torch

import lorakit
from lorakit.quant.blockwise import QuantConfig
from lorakit.quant.lq_lora import lq_decompose
from lorakit.verbs.lq_decompose import load_residual, lq_decompose_file, plan_budget


def low_rank_plus_noise(out, inn, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inn, generator=g) / inn**0.5 + torch.randn(out, r, generator=g) @ torch.randn(
        r, inn, generator=g
    ) * (2 / inn**0.5)


def test_without_quantization_it_is_the_rank_r_svd():
    W = low_rank_plus_noise(96, 64, 4).double()
    res = lq_decompose(W, 6, None, exact_svd=True)
    S = torch.linalg.svdvals(W)
    best = float((S[6:] ** 2).sum().sqrt() / W.norm())
    assert res.error == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_falls_over_accepted_iterations_and_the_best_is_kept(bits):
    W = low_rank_plus_noise(128, 128, 8, seed=bits)
    res = lq_decompose(W, 8, QuantConfig(bits, "nf", 64), iters=8)
    accepted = res.errors[: res.best_iteration + 1]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(accepted))
    assert res.error == min(res.errors)
    # The stored iterate reproduces its error: W − L1 L2 − Q, in float64.
    from lorakit.quant.blockwise import dequantize_tensor

    R = W.double() - res.L1.double() @ res.L2.double() - dequantize_tensor(res.Q).double()
    assert float(R.norm() / W.double().norm()) == pytest.approx(res.error, rel=1e-4)
    # Better than quantizing W alone at the same code.
    from lorakit.quant.blockwise import quantize_tensor

    plain = W - dequantize_tensor(quantize_tensor(W, QuantConfig(bits, "nf", 64)))
    assert res.error < float(plain.norm() / W.norm())


def test_ilp_meets_the_budget_and_picks_one_config_per_matrix():
    mats = {f"m{i}": low_rank_plus_noise(64 * (1 + i % 2), 64, 4, seed=i) for i in range(4)}
    numel = sum(m.numel() for m in mats.values())
    for budget in (2.6, 3.5, 5.0):
        chosen, facts = plan_budget(
            mats.__getitem__, list(mats), 4, budget, grid=((2, 64), (3, 64), (4, 64), (8, 64)), iters=1
        )
        assert set(chosen) == set(mats)
        assert facts["avg_bits"] <= budget
        stored = 0
        for n, cfg in chosen.items():
            from lorakit.quant.blockwise import quantize_tensor

            stored += quantize_tensor(mats[n], cfg).storage_bits
        assert stored / numel == pytest.approx(facts["avg_bits"])


def test_files_reproduce_the_decomposition(tmp_path):
    from lorakit.io.writer import write_safetensors

    W = {
        "a.weight": low_rank_plus_noise(128, 64, 4),
        "b.weight": low_rank_plus_noise(64, 128, 4, seed=1),
        "norm.weight": torch.ones(64),
    }
    base = tmp_path / "base.safetensors"
    write_safetensors(base, W)
    report = lq_decompose_file(base, tmp_path / "lq", rank=4, bits=4, iters=4)
    Q = load_residual(tmp_path / "lq" / "residual.safetensors")
    lora = lorakit.load(tmp_path / "lq" / "adapter")
    assert torch.equal(Q["norm.weight"], W["norm.weight"])
    rows = {r[0]: r for r in report.rows}
    for n in ("a.weight", "b.weight"):
        approx = Q[n].double() + lora[n.removesuffix(".weight")].delta(torch.float64)
        rel = float((W[n].double() - approx).norm() / W[n].double().norm())
        assert rel == pytest.approx(rows[n][6], rel=1e-4)
