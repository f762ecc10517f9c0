"""Byte-identity check of the file-producing verbs: run a fixed set of CLI commands, print one sha256 per output.

Used to show that a refactoring changes no output: run it before and after, and diff the two listings::

    OMP_NUM_THREADS=1 python -m benchmarks.identity_check > bench-out/identity_before.txt
    ... change the code ...
    OMP_NUM_THREADS=1 python -m benchmarks.identity_check | diff bench-out/identity_before.txt -

Every input is either a committed example (``examples/``) or generated here from fixed seeds (a tiny base
checkpoint and its fine-tuned copy for ``extract``/``apply``/``lq-decompose``, and two Llama-3-8B-shaped r=16
adapters cut to their first layer, by the generator of :mod:`benchmarks.perf`). Outputs go to fixed paths
under ``bench-out/identity/`` (provenance records input paths, so they must not move). The hash of a file is
sha256 of its bytes, whole (header JSON with metadata, then the tensor data); lorakit's metadata holds no
timestamp, so nothing is excluded. A directory lists every file in it, by relative path.

Cost: about a minute on one core (the 8B-shaped merges dominate).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench-out" / "identity"
EX = ROOT / "examples"
STYLE, DETAIL, TINY = EX / "style.safetensors", EX / "detail.safetensors", EX / "tiny-llama-lora"


def lorakit(*args: str | Path) -> None:
    cmd = [str(Path(sys.executable).with_name("lorakit")), *map(str, args), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")


def checkpoints() -> tuple[Path, Path]:
    """A tiny base checkpoint with the modules of ``examples/tiny-llama-lora`` (and a norm and an embedding),
    and a fine-tuned copy (low-rank changes plus a changed norm), from fixed seeds."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1234)
    base: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(100, 64, generator=g)}
    for layer in range(2):
        p = f"model.layers.{layer}"
        base[f"{p}.self_attn.q_proj.weight"] = torch.randn(64, 64, generator=g)
        base[f"{p}.self_attn.v_proj.weight"] = torch.randn(32, 64, generator=g)
        base[f"{p}.mlp.down_proj.weight"] = torch.randn(64, 128, generator=g)
        base[f"{p}.input_layernorm.weight"] = torch.ones(64)
    tuned = {}
    for k, t in base.items():
        if t.ndim == 2 and "embed" not in k:
            d = torch.randn(t.shape[0], 6, generator=g) @ torch.randn(6, t.shape[1], generator=g)
            tuned[k] = t + 0.05 * d
        else:
            tuned[k] = t + (0.01 if "norm" in k else 0.0)
    bdir, tdir = WORK / "in" / "base", WORK / "in" / "tuned"
    for d, sd in ((bdir, base), (tdir, tuned)):
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return bdir, tdir


def big_pair() -> list[Path]:
    """Two Llama-3-8B-shaped r=16 bf16 adapters (first layer: the 7 module shapes of the 8B), fixed seeds."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import perf

    perf.OUT = WORK / "in"  # the generator writes under OUT/perf/
    return perf.make_adapters("llama3-8b", 16, 2, layers=1)


def digest(path: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        out.append((str(f.relative_to(WORK / "out")), h))
    return out


def main() -> None:
    shutil.rmtree(WORK / "out", ignore_errors=True)
    (WORK / "out").mkdir(parents=True)
    o = WORK / "out"
    base, tuned = checkpoints()
    a8, b8 = big_pair()
    both = (STYLE, DETAIL)
    runs: list[tuple[str, list[str | Path]]] = [
        ("merge-cat.safetensors", ["merge", *both]),
        ("merge-cat-w.safetensors", ["merge", *both, "--weights", "0.7,0.3", "--to", "peft"]),
        ("merge-svd8", ["merge", *both, "--method", "svd", "--rank", "8", "--to", "peft"]),
        ("merge-svd-energy.safetensors", ["merge", *both, "--method", "svd", "--energy", "0.9"]),
        ("merge-ties.safetensors", ["merge", *both, "--method", "ties", "--density", "0.5", "--rank", "8"]),
        ("merge-dare.safetensors", ["merge", *both, "--method", "dare_ties", "--density", "0.5", "--seed", "3"]),
        ("merge-lego.safetensors", ["merge", *both, "--method", "lego", "--rank", "6"]),
        ("merge-knots.safetensors", ["merge", *both, "--method", "knots", "--param", "inner=ties",
                                     "--density", "0.5"]),
        ("merge-diffusers.safetensors", ["merge", *both, "--method", "svd", "--rank", "4", "--to", "diffusers",
                                         "--dtype", "float32"]),
        ("merge-tiny-svd", ["merge", TINY, TINY, "--weights", "0.5,0.5", "--method", "svd", "--rank", "8"]),
        ("resize-r4.safetensors", ["resize", STYLE, "--rank", "4"]),
        ("resize-energy", ["resize", TINY, "--energy", "0.9", "--to", "peft"]),
        ("resize-budget.safetensors", ["resize", STYLE, "--budget", "20000", "--dtype", "float32"]),
        ("convert-peft", ["convert", STYLE, "--to", "peft"]),
        ("convert-kohya.safetensors", ["convert", TINY, "--to", "kohya"]),
        ("quantize-4.safetensors", ["quantize", STYLE, "--bits", "4"]),
        ("quantize-mixed.safetensors", ["quantize", TINY, "--mixed", "--avg-bits", "3", "--block", "32"]),
        ("extract-r6", ["extract", base, tuned, "--rank", "6"]),
        ("extract-energy", ["extract", base, tuned, "--energy", "0.95", "--max-rank", "8"]),
        ("apply", ["apply", base / "model.safetensors", TINY]),
        ("lq", ["lq-decompose", base / "model.safetensors", "--rank", "4", "--bits", "4", "--iters", "3"]),
        ("merge-8b-cat.safetensors", ["merge", a8, b8, "--device", "cpu"]),
        ("merge-8b-svd.safetensors", ["merge", a8, b8, "--method", "svd", "--rank", "16", "--device", "cpu"]),
        ("merge-8b-lego.safetensors", ["merge", a8, b8, "--method", "lego", "--device", "cpu"]),
    ]
    for name, args in runs:
        lorakit(*args, "-o", o / name)
        if name == "quantize-4.safetensors":  # and back: the dequantize verb
            lorakit("dequantize", o / name, "-o", o / "dequantize-4.safetensors")
    for name in sorted(p.name for p in o.iterdir()):
        for rel, h in digest(o / name):
            print(f"{h}  {rel}")


if __name__ == "__main__":
    main()
