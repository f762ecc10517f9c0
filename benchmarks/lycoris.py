"""LoHa / LoKr → LoRA: lorakit's factored conversion against the dense route (form ΔW, then SVD).

The anchor is what extraction tools do (LyCORIS / kohya ``extract_lora``-style): build the dense ``out × in``
ΔW and take its SVD. lorakit builds the exact LoRA from the factors (face-splitting / Khatri–Rao for LoHa,
Kronecker SVDs for LoKr) and truncates through a QR-core SVD. Both are truncated to the same rank; errors are
measured against the dense float64 ΔW.

Run: ``.venv/bin/python -m benchmarks.lycoris`` (writes ``docs/benchmarks/lycoris.md``).
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import torch

CASES = [
    # name, kind, out, in, factor rank, target rank
    ("LoHa 1280x1280 r=16 (r²=256) → 64", "loha", 1280, 1280, 16, 64),
    ("LoHa 3072x3072 r=8 (r²=64) → 32", "loha", 3072, 3072, 8, 32),
    ("LoKr 1280x1280 w1 32x32 full, w2 40x40 r=8 → 64", "lokr", 1280, 1280, 8, 64),
    ("LoKr 3072x3072 w1 32x32 full, w2 96x96 r=8 → 64", "lokr", 3072, 3072, 8, 64),
]
REPEATS = 3


def make_inputs(kind: str, out: int, inn: int, r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "loha":
        return {"w1a": torch.randn(out, r, generator=g), "w1b": torch.randn(r, inn, generator=g),
                "w2a": torch.randn(out, r, generator=g), "w2b": torch.randn(r, inn, generator=g)}
    a = c = 32
    return {"w1": torch.randn(a, c, generator=g), "w2a": torch.randn(out // a, r, generator=g),
            "w2b": torch.randn(r, inn // c, generator=g)}


def dense_delta(kind: str, t: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    t = {k: v.to(dtype) for k, v in t.items()}
    if kind == "loha":
        return (t["w1a"] @ t["w1b"]) * (t["w2a"] @ t["w2b"])
    return torch.kron(t["w1"], t["w2a"] @ t["w2b"])


def lorakit_route(kind: str, t: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from lorakit.formats.lycoris import loha_factors, lokr_svd
    from lorakit.linalg import SVD, factored_svd

    if kind == "loha":
        B, A = loha_factors(t["w1a"], t["w1b"], t["w2a"], t["w2b"])
        f = factored_svd(B, A).truncate(k).to_factors()
        return f.B, f.A
    U, S, Vh = torch.linalg.svd(t["w1"], full_matrices=False)
    s2 = factored_svd(t["w2a"], t["w2b"])
    B, A, _ = lokr_svd(SVD(U, S, Vh), s2.truncate(min(s2.rank, t["w2a"].shape[1])), k)
    return B, A


def dense_route(kind: str, t: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    M = dense_delta(kind, t)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:k].sqrt()
    return U[:, :k] * root, root.unsqueeze(1) * Vh[:k]


def _child(route: str, case: tuple, q: mp.Queue) -> None:
    torch.set_num_threads(1)

    _, kind, out, inn, r, k = case
    t = make_inputs(kind, out, inn, r)
    fn = lorakit_route if route == "lorakit" else dense_route
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        B, A = fn(kind, t, k)
        times.append(time.perf_counter() - t0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    ref = dense_delta(kind, t, torch.float64)
    err = float(torch.linalg.norm(B.double() @ A.double() - ref) / torch.linalg.norm(ref))
    q.put((min(times), peak_kib, err))


def run(route: str, case: tuple) -> tuple[float, int, float]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(route, case, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    import os

    rows = []
    for case in CASES:
        lk, dn = run("lorakit", case), run("dense", case)
        rows.append((case[0], lk, dn))
        print(f"{case[0]:52s} lorakit {lk[0]*1e3:8.1f} ms  dense {dn[0]*1e3:8.1f} ms  "
              f"speed-up {dn[0]/lk[0]:6.1f}x  peak +{lk[1]/1024:6.1f} / +{dn[1]/1024:6.1f} MiB  "
              f"rel. error {lk[2]:.3e} / {dn[2]:.3e}")
    load = os.getloadavg()
    lines = [
        "## LyCORIS LoHa / LoKr → LoRA (truncated)",
        "",
        (f"Machine: {platform.processor() or platform.machine()}, shared 2-core CPU (load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} while measuring, other agents running), torch "
        f"{torch.__version__}, 1 thread, float32, best of {REPEATS} runs (the first includes one-off allocator costs). Command: `.venv/bin/python -m benchmarks.lycoris`."),
        "",
        ("lorakit: exact LoRA from the factors, then QR-core SVD / Kronecker SVD truncation. Dense: form ΔW, "
        "full SVD, truncate (what extraction tools do). Peak: growth of the process's max RSS during the timed "
        "runs (the first run included). Error: ‖ΔW_k − ΔW‖_F / ‖ΔW‖_F against float64 ΔW (both take the best rank-k approximation, so "
        "the errors agree)."),
        "",
        "| case | lorakit ms | dense ms | speed-up | lorakit peak MiB | dense peak MiB | lorakit error | dense error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, lk, dn in rows:
        lines.append(f"| {name} | {lk[0]*1e3:.1f} | {dn[0]*1e3:.1f} | {dn[0]/lk[0]:.1f}x | {lk[1]/1024:.1f} | "
                     f"{dn[1]/1024:.1f} | {lk[2]:.3e} | {dn[2]:.3e} |")
    out = Path("docs/benchmarks/lycoris.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
