"""Helpers for tests and benchmarks: random adapters with controlled spectra, and closeness checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch

from lorakit.adapter import Adapter, AdapterMeta
from lorakit.factors import LoraFactors

LLAMA_8B_SHAPES: dict[str, tuple[int, int]] = {
    # proj: (out, in) for Llama-3-8B; 32 layers × 7 projections = 224 modules.
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096),
    "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}


def random_factors(
    out: int,
    inn: int,
    rank: int,
    *,
    scale: float = 1.0,
    decay: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraFactors:
    """Random factors; with ``decay`` the singular values of B@A fall as ``decay**i`` (a trained-like spectrum)."""
    g = generator or torch.Generator().manual_seed(0)
    if decay is None:
        A = torch.randn(rank, inn, generator=g) / inn**0.5
        B = torch.randn(out, rank, generator=g) / rank**0.5
    else:
        qa, _ = torch.linalg.qr(torch.randn(inn, rank, generator=g))
        qb, _ = torch.linalg.qr(torch.randn(out, rank, generator=g))
        s = decay ** torch.arange(rank, dtype=torch.float32)
        # Mix within the subspace so the stored factors are not already in canonical form.
        mix, _ = torch.linalg.qr(torch.randn(rank, rank, generator=g))
        A = (mix @ (s.sqrt().unsqueeze(1) * qa.T))
        B = (qb * s.sqrt()) @ mix.T
    return LoraFactors(A.to(dtype), B.to(dtype), scale)


def random_adapter(
    shapes: Mapping[str, tuple[int, int]],
    rank: int | Mapping[str, int] = 8,
    *,
    scale: float = 1.0,
    decay: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    meta: AdapterMeta | None = None,
) -> Adapter:
    """An in-memory adapter with one random module per entry of ``shapes`` (name → (out, in))."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, (out, inn) in shapes.items():
        r = rank if isinstance(rank, int) else rank[name]
        mods[name] = random_factors(out, inn, r, scale=scale, decay=decay, generator=g, dtype=dtype)
    return Adapter(mods, meta)


def llama_shapes(layers: int, shapes: Mapping[str, tuple[int, int]] = LLAMA_8B_SHAPES) -> dict[str, tuple[int, int]]:
    """Module name → (out, in) for a Llama-style stack: ``model.layers.{i}.{proj}``."""
    return {f"model.layers.{i}.{p}": s for i in range(layers) for p, s in shapes.items()}


def _module_message(module: str, message: str) -> str:
    return f"module {module}: {message}"


def assert_adapters_close(
    a: Adapter, b: Adapter, *, rtol: float = 1e-5, atol: float = 1e-6, names: Sequence[str] | None = None
) -> None:
    """Assert equal module sets and ΔW close in float64, module by module."""
    assert set(a) == set(b), f"module sets differ: {sorted(set(a) ^ set(b))[:5]}"
    for n in names or list(a):
        da, db = a[n].delta(torch.float64), b[n].delta(torch.float64)
        torch.testing.assert_close(da, db, rtol=rtol, atol=atol, msg=partial(_module_message, n))
