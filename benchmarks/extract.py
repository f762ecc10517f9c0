"""Extract benchmark: a LoRA from a synthetic pair of Llama-3.2-1B-shaped checkpoints (float32, sharded).

Data: base weights ~ N(0, 0.02²) with Llama-3.2-1B shapes (16 layers, hidden 2048, MLP 8192, 8 KV heads of 64,
vocabulary 128256, embedding included and left unchanged); the fine-tune adds to every projection a difference
``D = U diag(σ) Vᵀ`` with σ_j = 0.5·0.97^j for j < 256 (orthonormal random U, V), so the optimal rank-k error
``sqrt(Σ_{j≥k} σ_j² / Σ σ_j²)`` is known exactly. Two modules are also checked against a float64 dense SVD of the
stored difference (float32 rounding of ``W + D`` perturbs it slightly).

Measured: wall time of `lorakit extract BASE TUNED --rank 16` in a fresh process, its peak RSS against an idle
process that imported the same libraries, and the reported errors against the optimum.

Run: ``.venv/bin/python -m benchmarks.extract`` (writes docs/benchmarks/rank.md, section "extract").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.resize import write_section

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # Llama-3.2-1B
    "self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (512, 2048), "self_attn.v_proj": (512, 2048),
    "self_attn.o_proj": (2048, 2048), "mlp.gate_proj": (8192, 2048), "mlp.up_proj": (8192, 2048),
    "mlp.down_proj": (2048, 8192),
}
RANK_D, DECAY, TOP = 256, 0.97, 0.5


def sigma() -> torch.Tensor:
    return TOP * DECAY ** torch.arange(RANK_D, dtype=torch.float64)


def optimal_error(k: int) -> float:
    s2 = sigma() ** 2
    return math.sqrt(float(s2[k:].sum() / s2.sum()))


def make_pair(root: Path, layers: int, shards: int, seed: int, vocab: int = 128256) -> tuple[Path, Path, int]:
    """Write base/ and tuned/ (sharded, with index); returns their paths and the largest extracted tensor's bytes."""
    from lorakit.io.checkpoint import CheckpointWriter

    g = torch.Generator().manual_seed(seed)
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, 2048)}
    for i in range(layers):
        names[f"model.layers.{i}.input_layernorm.weight"] = (2048,)
        for p, s in SHAPES.items():
            names[f"model.layers.{i}.{p}.weight"] = s
        names[f"model.layers.{i}.post_attention_layernorm.weight"] = (2048,)
    names["model.norm.weight"] = (2048,)
    keys = list(names)
    per = math.ceil(len(keys) / shards)
    layout = {f"model-{j + 1:05d}-of-{shards:05d}.safetensors": keys[j * per:(j + 1) * per] for j in range(shards)}
    base, tuned = root / "base", root / "tuned"
    with CheckpointWriter(base, layout) as wb, CheckpointWriter(tuned, layout) as wt:
        for k in keys:  # the layout's order is the writing order
            shape = names[k]
            w = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            wb.add(k, w)
            if len(shape) == 2 and "embed" not in k:
                m, n = shape
                U, _ = torch.linalg.qr(torch.randn(m, RANK_D, generator=g))
                V, _ = torch.linalg.qr(torch.randn(n, RANK_D, generator=g))
                w = w + (U * sigma().float()) @ V.T
            wt.add(k, w)
    for d in (base, tuned):
        (d / "config.json").write_text('{"model_type": "llama"}\n')
    largest = max(math.prod(s) * 4 for k, s in names.items() if len(s) == 2 and "embed" not in k)
    return base, tuned, largest


def run_child(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


IDLE = """
import json, torch, lorakit, lorakit.ops.extract, lorakit.cli.main
from benchmarks.resize import peak_rss_mb
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
"""
EXTRACT = """
import json, time, io, contextlib, torch
from benchmarks.resize import peak_rss_mb
torch.set_num_threads({threads})
from lorakit.cli.main import cli
t0 = time.perf_counter()
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    cli.main(["extract", {base!r}, {tuned!r}, "--rank", "{rank}", "-o", {out!r}, "--json"], standalone_mode=False)
dt = time.perf_counter() - t0
report = json.loads(buf.getvalue())
print(json.dumps({{"seconds": dt, "peak_rss_mb": peak_rss_mb(), "report": report}}))
"""


def dense_check(base: Path, tuned: Path, names: list[str], k: int) -> dict[str, float]:
    """Optimal rank-k error of the stored difference, by a float64 dense SVD (a few modules only)."""
    from lorakit.io.checkpoint import Checkpoint

    b, t = Checkpoint(base), Checkpoint(tuned)
    out = {}
    for n in names:
        d = t.get(n).double() - b.get(n).double()
        s2 = torch.linalg.svdvals(d) ** 2
        out[n.removesuffix(".weight")] = math.sqrt(float(s2[k:].sum() / s2.sum()))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks" / "rank.md"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    with tempfile.TemporaryDirectory(prefix="lorakit-extract-", dir=os.environ.get("TMPDIR")) as tmp:
        t0 = time.perf_counter()
        base, tuned, largest = make_pair(Path(tmp), a.layers, a.shards, 0, a.vocab)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"wrote 2 × {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s", flush=True)
        idle = run_child(IDLE)
        out = Path(tmp) / "lora"
        res = run_child(EXTRACT.format(threads=a.threads, base=str(base), tuned=str(tuned), rank=a.rank,
                                       out=str(out)))
        print(f"extract: {res['seconds']:.1f}s, peak RSS {res['peak_rss_mb']:.0f} MB (idle {idle['peak_rss_mb']:.0f})",
              flush=True)
        checked = dense_check(base, tuned, ["model.layers.0.self_attn.q_proj.weight",
                                            "model.layers.0.self_attn.k_proj.weight"], a.rank)
        lora_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    rows = res["report"]["modules"]
    opt = optimal_error(a.rank)
    worst = max(abs(r["rel error"] / opt - 1) for r in rows)
    dense_gap = max(abs(next(r["rel error"] for r in rows if r["module"] == n) / v - 1) for n, v in checked.items())
    extra = res["peak_rss_mb"] - idle["peak_rss_mb"]
    load = os.getloadavg()
    cmd = "python -m benchmarks.extract " + " ".join(sys.argv[1:])
    section = f"""## extract: LoRA from two Llama-3.2-1B-shaped checkpoints

Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs; load average at the end
{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}), {a.threads} torch thread(s); Python {platform.python_version()},
torch {torch.__version__}. Command: `{cmd.strip()}`.

Data: two float32 checkpoints of {size / 1e9:.2f} GB each ({a.shards} shards + index), {len(rows)} projections
extracted at rank {a.rank} (embedding and norms unchanged, excluded/skipped); each difference has σ_j = {TOP}·{DECAY}^j,
j < {RANK_D}, so the optimal relative error at rank {a.rank} is {opt:.6f}.

| quantity | value |
| --- | ---: |
| wall time, `lorakit extract --rank {a.rank}` (fresh process, imports included) | {res['seconds']:.1f} s |
| peak RSS of that process (`VmHWM`) | {res['peak_rss_mb']:.0f} MB |
| peak RSS of an idle process with the same imports | {idle['peak_rss_mb']:.0f} MB |
| extra memory for the extraction | {extra:.0f} MB = {extra * 1e6 / largest:.1f} × the largest tensor ({largest / 1e6:.0f} MB) |
| checkpoint size, for scale | {size / 1e6:.0f} MB each |
| reported error, min / max over modules | {min(r['rel error'] for r in rows):.6f} / {max(r['rel error'] for r in rows):.6f} |
| largest deviation from the optimal error (analytic) | {worst * 100:.3f} % |
| largest deviation from a float64 dense SVD of the stored difference (2 modules) | {dense_gap * 100:.3f} % |
| output LoRA size | {lora_mb:.1f} MB |

The randomized SVD used {a.rank}+10 probes and 4 power iterations (the defaults); errors are measured on the
residual, not estimated.
"""
    print(section)
    write_section(Path(a.doc), "extract", section)


if __name__ == "__main__":
    main()
