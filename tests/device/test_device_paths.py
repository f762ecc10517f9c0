"""The device-agnostic code paths on every available device, against independent float64 CPU references
(dense ΔW, plain-loop LEGO, planted clusters), not against lorakit's own CPU run.

``devices`` is ``["cpu"]`` plus ``"cuda"`` when a GPU is present; ``LORAKIT_TEST_DEVICE=cuda`` forces CUDA (the
tests then fail loudly on a machine without one instead of silently testing CPU only). On CPU the batched
paths must give the same numbers as the per-module ones, bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from benchmarks import merge_reference as reference
from benchmarks.lego_reference import reference_lego
from lorakit.adapter import Adapter
from lorakit.device import factors_to, resolve_device, to_device
from lorakit.errors import LorakitError
from lorakit.factors import LoraFactors
from lorakit.linalg import adapter_svds, factored_svd, group_by_shape, svd_of
from lorakit.ops.kmeans import kmeans
from lorakit.ops.rank_rules import rank_rule
from lorakit.ops.registry import resolve
from lorakit.pipeline import merge_adapters, plan_merge, run_merge
from lorakit.quant.quantize import quantize_module
from lorakit.run import RunOptions
from lorakit.testing import random_adapter, random_factors
from lorakit.verbs.resize import resize


def _devices() -> list[str]:
    forced = os.environ.get("LORAKIT_TEST_DEVICE")
    if forced:
        return sorted({"cpu", forced})
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


DEVICES = _devices()
SHAPES = {  # two layers of a small Llama-like stack: four distinct shapes, so grouping has work to do
    f"model.layers.{i}.{p}": s for i in range(2)
    for p, s in {"q": (48, 48), "k": (16, 48), "v": (16, 48), "up": (96, 48), "down": (48, 96)}.items()
}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def dense64(f: LoraFactors) -> torch.Tensor:
    return f.delta(torch.float64).cpu()


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double().cpu() - ref).norm() / ref.norm())


def pair(seed: int = 0, rank: int = 6):
    return (random_adapter(SHAPES, rank, scale=1.5, decay=0.7, seed=seed),
            random_adapter(SHAPES, rank, scale=0.5, decay=0.8, seed=seed + 1))


# ---- the transfer helper --------------------------------------------------------------------------------------
def test_to_device_on_cpu_returns_the_same_tensor():
    t = torch.randn(3, 4)
    assert to_device(t, "cpu") is t  # no copy: the CPU path computes exactly what it did before
    assert to_device(t, "cpu", torch.float64).dtype == torch.float64


def test_factors_to_moves_every_tensor(device):
    f = random_factors(8, 6, 2, generator=torch.Generator().manual_seed(0))
    g = factors_to(f, device)
    assert g.A.device.type == g.B.device.type == device
    assert torch.equal(g.A.cpu(), f.A) and torch.equal(g.B.cpu(), f.B) and g.scale == f.scale


# ---- factored SVD: batched vs one by one, on the device, vs float64 -------------------------------------------
def test_factored_svd_batched_matches_float64_reference(device):
    g = torch.Generator().manual_seed(1)
    B1, A1 = torch.randn(5, 40, 4, generator=g), torch.randn(5, 4, 30, generator=g)
    B2, A2 = torch.randn(5, 40, 3, generator=g), torch.randn(5, 3, 30, generator=g)
    svd = factored_svd([to_device(B1, device), to_device(B2, device)], [to_device(A1, device), to_device(A2, device)],
                       [0.7, -1.3])
    ref = 0.7 * B1.double() @ A1.double() - 1.3 * B2.double() @ A2.double()
    assert svd.S.device.type == device
    for i in range(5):
        assert rel(svd.dense()[i], ref[i]) < 1e-6
        assert torch.allclose(svd.S[i].double().cpu(), torch.linalg.svdvals(ref[i])[:7], rtol=1e-5, atol=1e-6)


def test_factored_svd_batched_equals_unbatched_on_cpu():
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(6, 32, 5, generator=g), torch.randn(6, 5, 24, generator=g)
    batched = factored_svd(B, A)
    for i in range(6):
        one = factored_svd(B[i], A[i])
        assert torch.equal(batched.U[i], one.U) and torch.equal(batched.S[i], one.S)
        assert torch.equal(batched.Vh[i], one.Vh)


def test_adapter_svds_batched_equals_per_module_svd_on_cpu():
    a = random_adapter(SHAPES, 5, scale=2.0, decay=0.8, seed=3)
    assert len(group_by_shape(a.infos())) == 4
    got = dict(adapter_svds(a))
    assert set(got) == set(a)
    for n in a:
        one = svd_of(a[n])
        assert torch.equal(got[n].S, one.S) and torch.equal(got[n].U, one.U) and torch.equal(got[n].Vh, one.Vh)


def test_adapter_svds_on_device_match_float64(device):
    a = random_adapter(SHAPES, 5, scale=2.0, decay=0.8, seed=4)
    for n, svd in adapter_svds(a, device=device):
        assert rel(svd.dense(), dense64(a[n])) < 1e-6


def test_group_by_shape_keys_modules_across_inputs():
    a, b = random_adapter(SHAPES, 4, seed=0), random_adapter(SHAPES, 6, seed=1)
    groups = group_by_shape({n: (a.info(n), b.info(n)) for n in a})
    assert set(groups) == {((48, 48, 4), (48, 48, 6)), ((16, 48, 4), (16, 48, 6)), ((96, 48, 4), (96, 48, 6)),
                           ((48, 96, 4), (48, 96, 6))}
    assert groups[((16, 48, 4), (16, 48, 6))] == [f"model.layers.{i}.{p}" for i in range(2) for p in ("k", "v")]


# ---- resize -----------------------------------------------------------------------------------------------------
def test_resize_on_device_matches_float64_truncation(device):
    a = random_adapter(SHAPES, 8, scale=2.0, decay=0.7, seed=5)
    out, _rows = resize(a, rank_rule(rank=3), device=device)
    for n in a:
        U, S, Vh = torch.linalg.svd(dense64(a[n]), full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert out[n].A.device.type == "cpu" and out[n].rank == 3
        assert rel(dense64(out[n]), best) < 1e-5



@pytest.mark.parametrize("how", [{"rule": rank_rule(rank=3)}, {"rule": rank_rule(energy=0.8)}, {"budget": 4000}])
def test_resize_windows_equal_one_module_at_a_time(device, how):
    """The CUDA default batches 512 MiB windows of same-shaped modules; the CPU default takes one module at a
    time. Both give the same modules (bit for bit on CPU) and the same report."""
    from lorakit.verbs.resize import resize_stream

    a = random_adapter(SHAPES, 8, scale=2.0, decay=0.7, seed=6)
    one_by_one, rows1 = resize_stream(a, device="cpu", window_bytes=1, **how)
    windowed, rows2 = resize_stream(a, device=device, window_bytes=1 << 30, **how)
    for n in reversed(list(a)):  # out of order: a window computes modules ahead of the one asked for
        x, y = one_by_one[n], windowed[n]
        assert windowed.info(n).rank == y.rank == x.rank and y.A.device.type == "cpu"
        if device == "cpu":
            assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)
        else:
            assert rel(dense64(y), dense64(x)) < 1e-5
    assert rows1.keys() == rows2.keys()
    for n in a:
        assert rows1[n].rank_out == rows2[n].rank_out
        assert rows1[n].rel_error == pytest.approx(rows2[n].rel_error, rel=1e-6, abs=1e-9)

# ---- merges -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_bytes", [None, 4096, 1 << 30])  # the default (one module); small windows; one
def test_svd_merge_batched_equals_per_module_operator_on_cpu(batch_bytes):
    a, b = pair(6)
    plan = plan_merge([a, b], [0.6, -0.4], "svd", rank=5)
    batched = run_merge(plan, RunOptions.resolve("cpu", window_bytes=batch_bytes))
    merged = batched.adapter.materialize()
    op = resolve("svd").fn
    for n in a:
        one = op([a[n], b[n]], [0.6, -0.4], rank_rule=rank_rule(rank=5))
        assert torch.equal(merged[n].A, one.factors.A) and torch.equal(merged[n].B, one.factors.B)
        assert batched.results[n].error == one.error


def test_svd_merge_energy_rule_batched_equals_unbatched():
    a, b = pair(7)
    plan = plan_merge([a, b], [1.0, 1.0], "svd", energy=0.9)
    x = run_merge(plan, RunOptions.resolve("cpu")).adapter.materialize()
    y = run_merge(plan, RunOptions.resolve("cpu", window_bytes=0)).adapter.materialize()
    for n in a:
        assert x[n].rank == y[n].rank and torch.equal(x[n].A, y[n].A) and torch.equal(x[n].B, y[n].B)


def test_svd_merge_batches_keep_each_modules_compute_dtype():
    a, b = pair(17)
    names = list(a)
    mixed = Adapter({n: a[n].to(dtype=torch.float64) if i % 2 else a[n] for i, n in enumerate(names)})
    plan = plan_merge([mixed, b], [1.0, 1.0], "svd", rank=3)
    merged = run_merge(plan, RunOptions.resolve("cpu")).adapter.materialize()
    op = resolve("svd").fn
    for i, n in enumerate(names):
        one = op([mixed[n], b[n]], [1.0, 1.0], rank_rule=rank_rule(rank=3))
        assert merged[n].dtype == (torch.float64 if i % 2 else torch.float32)
        assert torch.equal(merged[n].A, one.factors.A.to(merged[n].dtype))
        assert torch.equal(merged[n].B, one.factors.B.to(merged[n].dtype))


def test_svd_merge_union_groups_by_present_inputs():
    a, b = pair(8)
    b = b.select([n for n in b if ".layers.0." in n])
    plan = plan_merge([a, b], [1.0, 1.0], "svd", rank=4, module_set="union")
    merged = run_merge(plan, RunOptions.resolve("cpu")).adapter.materialize()
    for n in a:
        parts = [a[n], b[n]] if n in b else [a[n]]
        target = sum(dense64(f) for f in parts)
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        assert rel(dense64(merged[n]), (U[:, :4] * S[:4]) @ Vh[:4]) < 1e-5


def test_svd_merge_on_device_matches_float64_best_approximation(device):
    a, b = pair(9)
    merged, results = merge_adapters([a, b], [0.5, 0.5], "svd", rank=4, device=device)
    for n in a:
        target = 0.5 * dense64(a[n]) + 0.5 * dense64(b[n])
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        assert rel(dense64(merged[n]), (U[:, :4] * S[:4]) @ Vh[:4]) < 1e-5
        tail = float(S[4:].square().sum().sqrt() / S.square().sum().sqrt())
        assert abs(results[n].error - tail) < 1e-5


def test_ties_merge_on_device_matches_float64_dense_reference(device):
    """Against the plain dense float64 TIES (benchmarks.merge_reference), truncated to the rank: lorakit's
    randomized range finder may not beat the exact truncation, and must come within 0.01% of its error."""
    a, b = pair(10)
    got, results = merge_adapters([a, b], [1.0, 1.0], "ties", density=0.5, rank=4, device=device,
                                  dtype=torch.float64)
    for n in a:
        target = reference.ties([dense64(a[n]), dense64(b[n])], 0.5)
        best = rel(reference.svd_truncate(target, 4), target)
        err = rel(dense64(got[n]), target)
        assert best - 1e-9 <= err <= best * (1 + 1e-4)
        assert abs(results[n].error - err) < 1e-6  # the reported error is the real one


def test_cat_merge_is_exact_on_device(device):
    a, b = pair(11)
    merged, _ = merge_adapters([a, b], [2.0, -1.0], "cat", device=device)
    for n in a:
        assert rel(dense64(merged[n]), 2 * dense64(a[n]) - dense64(b[n])) < 1e-6


# ---- k-means (LEGO) and quantization ----------------------------------------------------------------------------
def test_kmeans_on_device_finds_the_planted_clusters(device):
    g = torch.Generator().manual_seed(12)
    centres = torch.randn(3, 5, generator=g, dtype=torch.float64) * 10
    X = torch.cat([c + 0.1 * torch.randn(20, 5, generator=g, dtype=torch.float64) for c in centres])
    got = kmeans(to_device(X, device), 3, seed=0)
    labels = got.labels.cpu()
    planted = torch.arange(3).repeat_interleave(20)
    assert len({(int(p), int(q)) for p, q in zip(planted, labels)}) == 3  # the same partition, up to names
    for j in range(3):
        members = X[labels == j]
        assert torch.allclose(got.centroids[j].cpu(), members.mean(0), atol=1e-10)
    inertia = sum(float((X[labels == j] - X[labels == j].mean(0)).square().sum()) for j in range(3))
    assert abs(got.inertia - inertia) < 1e-8 * inertia


def test_lego_merge_on_device_matches_the_float64_loop_reference(device):
    """Against benchmarks.lego_reference (plain loops, no code shared with lorakit), same seed."""
    a, b = pair(13, rank=4)
    got, _ = merge_adapters([a, b], [1.0, 1.0], "lego", rank=4, device=device, dtype=torch.float64)
    for n in a:
        fs = [x[n] for x in (a, b)]
        ref = reference_lego([(f.B.double(), f.A.double(), f.scale) for f in fs], [1.0, 1.0], 4)
        assert rel(dense64(got[n]), ref.delta) < 1e-6


def test_quantize_on_device_matches_cpu(device):
    f = random_factors(64, 128, 8, scale=2.0, decay=0.8, generator=torch.Generator().manual_seed(14))
    q_cpu, err_cpu = quantize_module("m", f, bits=4, device="cpu")
    q_dev, err_dev = quantize_module("m", f, bits=4, device=device)
    x, y = q_cpu.factors(torch.float64), q_dev.factors(torch.float64)
    assert rel(dense64(y), dense64(x)) < 1e-5
    assert abs(err_cpu - err_dev) < 1e-5
    assert abs(err_cpu - rel(dense64(x), dense64(f))) < 1e-6  # the reported error is the real one


# ---- --device on the CLI ------------------------------------------------------------------------------------------
@no_cuda
def test_resolve_device_cuda_without_gpu_is_an_error():
    with pytest.raises(LorakitError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("verb", [
    ["merge", "{a}", "{b}", "-o", "{out}", "--method", "svd"],
    ["merge", "{a}", "{b}", "--dry-run"],
    ["resize", "{a}", "-o", "{out}", "--rank", "2"],
    ["inspect", "{a}", "--spectrum"],
    ["similarity", "{a}", "{b}"],
    ["quantize", "{a}", "-o", "{out}"],
    ["lq-decompose", "{base}", "-o", "{out}", "--rank", "2"],
    ["apply", "{base}", "{a}", "-o", "{out}"],
    ["extract", "{base}", "{base}", "-o", "{out}", "--rank", "2"],
])
def test_cli_device_cuda_without_gpu_is_one_line_error(cli, tmp_path, verb):
    a, b = pair(15)
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out.safetensors"
    lorakit.save(a, pa, format="peft")
    lorakit.save(b, pb, format="peft")
    base = tmp_path / "base.safetensors"
    save_file({f"{n}.weight": torch.randn(*a.info(n).shape) for n in a}, str(base))
    before = pa.read_bytes()
    args = [x.format(a=pa, b=pb, out=out, base=base) for x in verb] + ["--device", "cuda"]
    code, out_text, err = cli(*args)
    assert code == 1, (out_text, err)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert not out.exists() and pa.read_bytes() == before


def test_cli_device_cpu_runs_the_merge(cli, tmp_path):
    a, b = pair(16)
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    lorakit.save(a, pa, format="peft")
    lorakit.save(b, pb, format="peft")
    code, _, err = cli("merge", pa, pb, "-o", out, "--method", "svd", "--rank", "3", "--device", "cpu", "--quiet")
    assert code == 0, err
    merged = lorakit.load(out)
    for n in a:
        target = dense64(a[n]) + dense64(b[n])
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        assert rel(dense64(merged[n]), (U[:, :3] * S[:3]) @ Vh[:3]) < 1e-2  # stored in float32 → tiny rounding


def test_streamed_merge_keeps_no_factors_in_its_results():
    a, b = pair(18)
    run = run_merge(plan_merge([a, b], [1.0, 1.0], "svd", rank=3), RunOptions.resolve("cpu"))
    merged = run.adapter.materialize()
    for n in a:
        kept = run.results[n].factors
        assert kept.A.device.type == "meta" and kept.B.device.type == "meta"  # shape only: nothing held
        assert kept.rank == merged[n].rank == 3 and kept.shape == merged[n].shape
