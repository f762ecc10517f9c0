"""The performance record: lorakit end to end against the physical I/O floor, at several model sizes.

For each case (model shape × rank × number of adapters) the suite writes the input adapters (bf16, decaying
spectra) to ``bench-out/perf/``, then measures in fresh processes:

- ``lorakit merge … --method svd`` end to end (load, merge, save): wall time and peak resident memory;
- the physical floor: the time to read every input byte and write as many bytes as the output has, at the
  bandwidth measured on this machine right then (page cache warm, as for lorakit);
- ``lorakit resize`` of the first input to rank/4;
- peers, in the same run, on the cases where they finish in minutes: PEFT ``add_weighted_adapter``
  (``svd``, ``cat``, ``ties_svd``, ``dare_ties_svd``; the driver of :mod:`benchmarks.merge`, timed on every
  projection of layer 0 and extrapolated by the layer count) against ``lorakit merge`` end to end with the same
  method, and the dense-SVD resize route as kohya does it (the driver of :mod:`benchmarks.resize`, timed on one
  module per shape and extrapolated by the module counts).

Every child runs with one torch thread (``OMP_NUM_THREADS=1``) unless ``--threads`` says otherwise, as the other
benchmarks do. Results go to ``docs/benchmarks/perf.json`` (machine, device, versions, load average, every
number) and ``docs/benchmarks/perf.md`` (a partial run, with ``--quick``, ``--cases`` or ``--no-peers``, writes to
``bench-out/perf-partial/`` instead, leaving the record alone). Run: ``python -m benchmarks.perf [--quick] [--cases NAME,...]
[--device auto|cpu|cuda] [--no-peers]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

from benchmarks._env import DOCS, OUT, header_markdown, machine, run_measured, versions

SHAPES: dict[str, dict[str, object]] = {
    # name: hidden, intermediate, kv (k/v out), layers
    "tinyllama": {"hidden": 2048, "inter": 5632, "kv": 256, "layers": 22},
    "llama3-8b": {"hidden": 4096, "inter": 14336, "kv": 1024, "layers": 32},
    "llama3-70b": {"hidden": 8192, "inter": 28672, "kv": 1024, "layers": 80},
}
CASES = [
    # (shape, rank, adapters); the full grid minus what does not fit ~15 minutes on the 2-core machine
    ("tinyllama", 16, 2), ("tinyllama", 64, 2), ("tinyllama", 16, 8),
    ("tinyllama", 64, 8),
    ("llama3-8b", 16, 2), ("llama3-8b", 64, 2), ("llama3-8b", 16, 8),
    ("llama3-70b", 16, 2), ("llama3-70b", 64, 2),
]
LEFT_OUT = [("llama3-8b", 64, 8), ("llama3-70b", 16, 8), ("llama3-70b", 64, 8)]
E2E_PEERS = ("svd", "cat")  # methods also run end to end (whole adapter, fresh process) beside PEFT
PEER_SHAPES = ["tinyllama"]  # PEFT and the dense resize on 8B shapes take tens of minutes on 2 cores (--peers-on)
PEFT_METHODS = {  # PEFT combination_type -> lorakit merge arguments
    "svd": ["--method", "svd"],
    "cat": ["--method", "cat"],
    "ties_svd": ["--method", "ties", "--density", "0.5", "--rank", "16"],
    "dare_ties_svd": ["--method", "dare_ties", "--density", "0.5", "--rank", "16"],
}
QUICK = [("tinyllama", 16, 2), ("llama3-8b", 16, 2)]
DELTA_METHODS = {  # delta-space methods run end to end on whole r=16 pairs (density 0.5, rank 16)
    "ties": ["--method", "ties", "--density", "0.5", "--rank", "16"],
    "dare_ties": ["--method", "dare_ties", "--density", "0.5", "--rank", "16"],
    "della": ["--method", "della", "--density", "0.5", "--rank", "16"],
    "magnitude_prune": ["--method", "magnitude_prune", "--density", "0.5", "--rank", "16"],
}
DELTA_SHAPES = ["tinyllama", "llama3-8b"]  # shapes whose r=16 pair runs every delta method end to end
COST_METHODS = {  # the cost table's methods -> lorakit arguments (resize: the first input to rank/4)
    "svd": ["--method", "svd"],
    "cat": ["--method", "cat"],
    "ties": ["--method", "ties", "--density", "0.5", "--rank", "16"],
    "dare": ["--method", "dare_ties", "--density", "0.5", "--rank", "16"],
    "lego": ["--method", "lego"],
    "resize": [],
}
COST_HEAVY = {"ties", "dare", "lego"}  # dense or clustering work: timed on COST_LAYERS["heavy"] layers
COST_LAYERS = {"light": {"llama3-8b": 32, "llama3-70b": 8}, "heavy": {"llama3-8b": 1, "llama3-70b": 1}}


def module_shapes(name: str, layers: int | None = None) -> dict[str, tuple[int, int]]:
    """Every module of the shape's adapter; ``layers`` keeps only the first ones (a sampled cost-table case)."""
    s = SHAPES[name]
    h, i, kv = s["hidden"], s["inter"], s["kv"]
    layers = int(s["layers"]) if layers is None else layers  # type: ignore[call-overload]
    per = {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
    }
    return {f"model.layers.{n}.{p}": shp for n in range(layers) for p, shp in per.items()}  # type: ignore[misc]


def module_factors(name: str, out_features: int, in_features: int, rank: int, k: int):  # -> LoraFactors
    """The factors of module ``name`` of the ``k``-th generated adapter (bf16, scale 2, decaying spectrum; seeded
    by the name and ``k``, so a sampled module equals the whole adapter's)."""
    from lorakit.testing import random_factors

    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{k}".encode()))
    return random_factors(out_features, in_features, rank, scale=2.0, decay=0.85, generator=g, dtype=torch.bfloat16)


def make_adapters(shape: str, rank: int, n: int, layers: int | None = None) -> list[Path]:
    """Write (or reuse) ``n`` PEFT-style single-file adapters; one module at a time, so memory stays small.
    ``layers`` writes only the first layers (the same factors as the whole adapter's, module by module)."""
    from lorakit.adapter import Adapter, AdapterMeta, ModuleInfo
    from lorakit.api import save

    paths = []
    shapes = module_shapes(shape, layers)
    tag = "" if layers is None else f"-L{layers}"
    for k in range(n):
        path = OUT / "perf" / f"{shape}{tag}-r{rank}-{k}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        infos = {m: ModuleInfo(m, o, i, rank, 2.0, torch.bfloat16) for m, (o, i) in shapes.items()}

        adapter = Adapter({m: (lambda m=m, k=k: module_factors(m, *shapes[m], rank, k)) for m in shapes},
                          AdapterMeta(source_format="peft"), infos)
        save(adapter, path, format="peft")
    return paths


def io_floor(inputs: list[Path], output_bytes: int, repeat: int = 3) -> float:
    """Seconds to read every input byte and write ``output_bytes`` (page cache warm, no fsync, like lorakit),
    best of ``repeat``: one timing of a sub-second floor moved 6× between records (0.066 against 0.4 s), and
    the merges it is compared with are best of 3 as well."""
    for p in inputs:  # warm the cache as lorakit's run found it
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    block = os.urandom(1 << 20) * 16
    scratch = OUT / "perf" / "floor.tmp"
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for p in inputs:
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        with open(scratch, "wb") as f:
            left = output_bytes
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
        best = min(best, time.perf_counter() - t0)
        scratch.unlink()
    return best


def lorakit_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("lorakit")), *args]


SETTINGS = {"device": "auto", "threads": "1"}


def child_env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": SETTINGS["threads"], "MKL_NUM_THREADS": SETTINGS["threads"]}


def lorakit_merge_e2e(inputs: list[Path], out: Path, method_args: list[str]):
    r = run_measured(lorakit_cmd("merge", *map(str, inputs), "-o", str(out), *method_args, "--quiet",
                                 "--device", SETTINGS["device"]), env=child_env())
    if r.returncode != 0:
        raise RuntimeError(f"lorakit merge failed: {r.stderr[-2000:]}")
    return r


def peers(shape: str, rank: int, inputs: list[Path]) -> dict[str, object]:
    """PEFT's add_weighted_adapter (layer 0, extrapolated) and lorakit end to end with the same method;
    the dense-SVD resize route (one module per shape, extrapolated)."""
    from benchmarks import merge as merge_bench
    from benchmarks import resize as resize_bench

    layers = int(SHAPES[shape]["layers"])  # type: ignore[call-overload]
    subset = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out: dict[str, object] = {"peft_layers_timed": 1, "peft_extrapolated_by": layers}
    rows = []
    if rank == merge_bench.RANK:  # the PEFT driver builds its LoRA config at benchmarks.merge.RANK
        for combination, args in PEFT_METHODS.items():
            (p_s, p_err, _), p_mb = merge_bench.in_child(merge_bench.peft_merge, [str(p) for p in inputs[:2]],
                                                         combination, subset, 0.5)
            ours_layer0, ours_err = None, None
            if combination != "cat":  # the driver asks for a rank, which the exact cat refuses
                method = args[args.index("--method") + 1]
                params = {"density": 0.5} if "--density" in args else {}
                (ours_layer0, ours_errs, _), _ = merge_bench.in_child(
                    merge_bench.lorakit_merge, [str(p) for p in inputs[:2]], method, subset, params)
                ours_err = sum(ours_errs.values()) / len(ours_errs)
            ours = None
            if combination in E2E_PEERS:  # the delta-space ones take minutes end to end on 1 core: layer 0 only
                merged = OUT / "perf" / f"peer-{combination}.safetensors"
                ours = lorakit_merge_e2e(inputs[:2], merged, args)
                merged.unlink()
            rows.append({"method": combination, "peft_layer0_s": round(p_s, 3), "peft_full_s": round(p_s * layers, 1),
                         "peft_peak_rss_mb": round(p_mb),
                         "lorakit_layer0_s": None if ours_layer0 is None else round(ours_layer0, 3),
                         "lorakit_e2e_s": None if ours is None else round(ours.seconds, 3),
                         "lorakit_peak_rss_mb": None if ours is None else round(ours.peak_rss_mb),
                         "peft_over_lorakit_e2e": None if ours is None else round(p_s * layers / ours.seconds, 1),
                         "peft_over_lorakit_layer0": None if ours_layer0 is None else round(p_s / ours_layer0, 1),
                         # mean relative error of the rank-16 result against each tool's own dense target
                         "peft_mean_error": round(sum(p_err.values()) / len(p_err), 5),
                         "lorakit_mean_error": None if ours_err is None else round(ours_err, 5)})
            print(rows[-1], flush=True)
    out["peft"] = rows
    resize_bench.THREADS[0] = SETTINGS["threads"]
    k = max(1, rank // 4)
    dense = resize_bench.child(["--child", "dense", "--src", str(inputs[0]), "--rank", str(k), "--device",
                                "cuda" if SETTINGS["device"] == "cuda" else "cpu", "--threads", SETTINGS["threads"]])
    out["dense_resize_s"] = round(dense["total_transposed_s"], 2)
    out["dense_resize_max_agreement"] = max(dense["agreement"].values())
    return out


DELTA_STAGES = ("kth_largest_abs_bracketed", "sample_abs", "merge_dense", "refactor", "probe")


def delta_stage_profile(shape: str = "llama3-8b", modules: tuple[str, ...] = ("mlp.gate_proj", "self_attn.q_proj"),
                        methods: tuple[str, ...] = ("ties", "magnitude_prune", "dare_ties"), repeat: int = 3
                        ) -> list[dict[str, object]]:
    """CPU ns per ΔW entry of a pair, by stage, of each delta method on one module of each given kind (two r=16
    bf16 inputs made as :func:`make_adapters` makes them, density 0.5, rank 16), in this process, best of
    ``repeat``.

    Stages are the sample and counting pass of the exact thresholds, the merge pass, the probe and the refactor
    (``lorakit.ops.merge_delta``'s functions, timed with ``time.process_time`` by wrapping them). To compare
    with earlier kernels, run this at both commits in one window (docs/performance.md has such a record)."""
    from lorakit.ops import _kernels as K
    from lorakit.ops import merge_delta as D
    from lorakit.ops.rank_rules import RankRule
    from lorakit.ops.scratch import Scratch

    scratch = Scratch()  # as the pipeline lends its modules (the dense M is not faulted in anew each time)
    spent: dict[str, float] = {}
    owner = {name: (K if hasattr(K, name) else D) for name in DELTA_STAGES}
    originals = {name: getattr(owner[name], name) for name in DELTA_STAGES}

    def timed(name: str, f):  # type: ignore[no-untyped-def]
        def g(*a, **kw):  # type: ignore[no-untyped-def]
            t0 = time.process_time()
            try:
                return f(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - t0
        return g

    rows: list[dict[str, object]] = []
    try:
        for name, f in originals.items():
            setattr(owner[name], name, timed(name, f))
        for m in modules:
            name = f"model.layers.0.{m}"
            o, i = module_shapes(shape, 1)[name]
            fs = [module_factors(name, o, i, 16, k) for k in range(2)]
            for method in methods:
                best: dict[str, object] | None = None
                for _ in range(repeat):
                    spent.clear()
                    t0 = time.process_time()
                    res = getattr(D, method)(fs, [1.0, 1.0], density=0.5, rank_rule=RankRule("rank", 16),
                                             scratch=scratch)
                    total = time.process_time() - t0
                    row = {"module": m, "method": method, "total_ns": round(total / (o * i) * 1e9, 2),
                           "stages_ns": {k: round(v / (o * i) * 1e9, 2) for k, v in spent.items()},
                           "error": round(res.error, 6), "load": round(os.getloadavg()[0], 2)}
                    if best is None or row["total_ns"] < best["total_ns"]:  # type: ignore[operator]
                        best = row
                assert best is not None
                rows.append(best)
                print(best, flush=True)
    finally:
        for name, f in originals.items():
            setattr(owner[name], name, f)
    return rows


def run_case(shape: str, rank: int, n: int, with_peers: bool = True, with_delta: bool = True) -> dict[str, object]:
    inputs = make_adapters(shape, rank, n)
    out = OUT / "perf" / f"merged-{shape}-r{rank}-n{n}.safetensors"
    merged = lorakit_merge_e2e(inputs, out, ["--method", "svd"])
    floor = io_floor(inputs, out.stat().st_size)
    small = OUT / "perf" / f"resized-{shape}-r{rank}.safetensors"
    resized = run_measured(lorakit_cmd("resize", str(inputs[0]), "-o", str(small), "--rank", str(max(1, rank // 4)),
                                       "--quiet", "--device", SETTINGS["device"]), env=child_env())
    if resized.returncode != 0:
        raise RuntimeError(f"lorakit resize failed: {resized.stderr[-2000:]}")
    resize_floor = io_floor(inputs[:1], small.stat().st_size)
    in_bytes = sum(p.stat().st_size for p in inputs)
    result = {
        "shape": shape, "rank": rank, "adapters": n, "modules": len(module_shapes(shape)),
        "input_mb": round(in_bytes / 2**20, 1), "output_mb": round(out.stat().st_size / 2**20, 1),
        "merge_s": round(merged.seconds, 3), "merge_peak_rss_mb": round(merged.peak_rss_mb),
        "floor_s": round(floor, 3), "merge_over_floor": round(merged.seconds / floor, 1),
        "resize_s": round(resized.seconds, 3), "resize_peak_rss_mb": round(resized.peak_rss_mb),
        "resize_floor_s": round(resize_floor, 3),
    }
    module_mb = max(o + i for o, i in module_shapes(shape).values()) * rank * 2 * n / 2**20
    result["largest_module_inputs_mb"] = round(module_mb, 2)
    out.unlink()
    small.unlink()
    if with_delta and shape in DELTA_SHAPES and rank == 16 and n == 2:
        rows = {}
        for method, args in DELTA_METHODS.items():
            r = lorakit_merge_e2e(inputs, out, args)
            rows[method] = {"s": round(r.seconds, 2), "peak_rss_mb": round(r.peak_rss_mb)}
            print(method, rows[method], flush=True)
            out.unlink()
        result["delta"] = rows
    if with_peers and shape in PEER_SHAPES and n == 2:  # the peers merge two adapters
        result["peers"] = peers(shape, rank, inputs)
        result["resize_over_dense"] = round(result["peers"]["dense_resize_s"] / resized.seconds, 1)
        for row in result["peers"]["peft"]:  # the delta methods' whole-adapter runs above, beside PEFT's
            whole = (result.get("delta") or {}).get({"ties_svd": "ties", "dare_ties_svd": "dare_ties"}.get(
                row["method"], ""))
            if whole and row["lorakit_e2e_s"] is None:
                row["lorakit_e2e_s"], row["lorakit_peak_rss_mb"] = whole["s"], whole["peak_rss_mb"]
                row["peft_over_lorakit_e2e"] = round(row["peft_full_s"] / whole["s"], 1)
    return result


def best_of(cmd: list[str], repeat: int = 5, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    runs = [run_measured(cmd, env=env) for _ in range(repeat)]
    bad = [r for r in runs if r.returncode != 0]
    if bad:
        raise RuntimeError(f"{' '.join(cmd)} failed: {bad[0].stderr[-2000:]}")
    return min(runs, key=lambda m: m.seconds)


def startup_costs() -> dict[str, float]:
    """Best-of-5 wall seconds of commands that do little but start: against ``python -c "import torch"``."""
    big = make_adapters("llama3-8b", 16, 1)[0]
    cmds = {
        "import torch": [sys.executable, "-c", "import torch"],
        "lorakit --version": lorakit_cmd("--version"),
        "lorakit merge --help": lorakit_cmd("merge", "--help"),
        "lorakit inspect (8B r=16 adapter)": lorakit_cmd("inspect", str(big)),
    }
    return {name: round(best_of(cmd, env=child_env()).seconds, 3) for name, cmd in cmds.items()}


def two_core_8b() -> dict[str, object]:
    """The 8B merge of two r=16 adapters as a user runs it on a 2-core machine (two torch threads): ``svd`` to
    rank 16 and ``cat``, best of 3, beside the I/O floor and the start-up of that run."""
    inputs = make_adapters("llama3-8b", 16, 2)
    out = OUT / "perf" / "two-core.safetensors"
    env = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    res: dict[str, object] = {"threads": 2}
    for name, args in {"svd": ["--method", "svd", "--rank", "16"], "cat": ["--method", "cat"]}.items():
        r = best_of(lorakit_cmd("merge", *map(str, inputs), "-o", str(out), *args, "--quiet", "--device",
                                SETTINGS["device"]), repeat=3, env=env)
        res[name] = {"s": round(r.seconds, 3), "peak_rss_mb": round(r.peak_rss_mb),
                     "floor_s": round(io_floor(inputs, out.stat().st_size), 3)}
        out.unlink()
    res["startup_s"] = round(best_of([sys.executable, "-c", "import torch, lorakit, lorakit.cli.main"],
                                     repeat=3, env=env).seconds, 3)
    return res


def cost_table(startup_s: float, shapes: tuple[str, ...] = ("llama3-8b", "llama3-70b"),
               ranks: tuple[int, ...] = (16, 64), counts: tuple[int, ...] = (2, 4, 8)) -> list[dict[str, object]]:
    """2, 4, 8 adapters × r16/r64 × 8B/70B shapes × svd, cat, ties, dare, lego, resize, end to end.

    Light methods (svd, cat, resize) run on every layer of 8B and the first ``COST_LAYERS['light']`` layers of
    70B; heavy ones (ties, dare, lego: dense or clustering work) on the first ``COST_LAYERS['heavy']`` layers.
    A sampled case is extrapolated as ``start-up + (t − start-up)·layers/sampled``: every layer of these shapes
    has the same modules, so the work per layer is the same (the table marks each such number).
    """
    rows = []
    for shape in shapes:
        layers = int(SHAPES[shape]["layers"])  # type: ignore[call-overload]
        for rank in ranks:
            for n in counts:
                for method, args in COST_METHODS.items():
                    sampled = COST_LAYERS["heavy" if method in COST_HEAVY else "light"][shape]
                    inputs = make_adapters(shape, rank, n if method != "resize" else 1,
                                           None if sampled >= layers else sampled)
                    out = OUT / "perf" / "cost.safetensors"
                    if method == "resize":
                        if n != 2:
                            continue  # one input: the same for every adapter count
                        cmd = lorakit_cmd("resize", str(inputs[0]), "-o", str(out), "--rank", str(rank // 4),
                                          "--quiet", "--device", SETTINGS["device"])
                    else:
                        cmd = lorakit_cmd("merge", *map(str, inputs), "-o", str(out), *args, "--quiet",
                                          "--device", SETTINGS["device"])
                    r = run_measured(cmd, env=child_env())
                    row: dict[str, object] = {"shape": shape, "rank": rank, "adapters": 1 if method == "resize" else n,
                                              "method": method, "layers_timed": min(sampled, layers),
                                              "layers": layers, "peak_rss_mb": round(r.peak_rss_mb)}
                    if r.returncode != 0:
                        row["failed"] = (r.stderr.strip().splitlines() or ["?"])[-1][:120]
                    else:
                        row["measured_s"] = round(r.seconds, 2)
                        scale = layers / min(sampled, layers)
                        row["whole_s"] = round(startup_s + max(r.seconds - startup_s, 0.0) * scale, 1)
                        out.unlink(missing_ok=True)
                    print(row, flush=True)
                    rows.append(row)
                for p in (OUT / "perf").glob(f"{shape}-L*-r{rank}-*.safetensors"):
                    p.unlink()  # the sampled inputs of this rank: rebuilt cheaply, and 70B ones are large
    return rows


def baseline() -> tuple[float, float]:
    """(seconds, peak RSS MB) of a process that only imports torch, lorakit and its CLI: the fixed start-up cost."""
    r = min((run_measured([sys.executable, "-c", "import torch, lorakit, lorakit.cli.main"]) for _ in range(3)),
            key=lambda m: m.seconds)
    return r.seconds, r.peak_rss_mb


def tiny_merge_rss() -> float:
    """Peak RSS MB of a whole ``lorakit merge --method svd`` of the two bundled example adapters (12 small
    modules): start-up plus the code and allocator state any merge touches; the fixed memory cost of a merge."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    out = OUT / "perf" / "tiny-merge.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = [lorakit_merge_e2e([examples / "style.safetensors", examples / "detail.safetensors"], out,
                              ["--method", "svd"]) for _ in range(3)]
    out.unlink()
    return min(r.peak_rss_mb for r in runs)


def markdown(results: list[dict[str, object]], base_rss: float, command: str, loadavg: list[float],
             device: str, startup_s: float, tiny_rss: float, extra: dict[str, object] | None = None) -> str:
    extra = extra or {}
    lines = [
        "## Performance record: end to end against the I/O floor and the peers",
        "",
        header_markdown(),
        "",
        (f"Command: `{command}` (device: {device}; torch threads per process: {SETTINGS['threads']}; load average "
        f"at start/end: {loadavg[0]:.1f} / {loadavg[1]:.1f} on this shared 2-core machine)."),
        "Each lorakit run is a fresh process (the `lorakit` CLI), so times include interpreter and torch start-up",
        "(a few seconds on this machine). The floor is the time to read the inputs and write the output's bytes at this machine's",
        "measured bandwidth in the same run, page cache warm (no fsync, like lorakit), best of 3; on a shared machine",
        "sub-second floors still move by 2-3× between runs, and the ratios with them. lorakit's modules are",
        "byte-compiled before any timing, as an installed lorakit's are (benchmarks._env.precompile_lorakit).",
        f"A process that only starts lorakit takes {startup_s:.2f} s and peaks at {base_rss:.0f} MB resident; the",
        "`(merge − start-up)/floor` column takes that fixed start-up cost out.",
        "",
        ("| shape | modules | rank | adapters | inputs MB | svd merge s | floor s | merge/floor "
        "| (merge − start-up)/floor | merge peak MB "
        "| largest module (all inputs) MB | resize→r/4 s | resize peak MB |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['modules']} | {r['rank']} | {r['adapters']} | {r['input_mb']} | {r['merge_s']} "
            f"| {r['floor_s']} | {r['merge_over_floor']} "
            f"| {max(0.0, float(r['merge_s']) - startup_s) / float(r['floor_s']):.1f} | {r['merge_peak_rss_mb']} "
            f"| {r['largest_module_inputs_mb']} | {r['resize_s']} | {r['resize_peak_rss_mb']} |"
        )
    starts = extra.get("startup")
    if starts:
        torch_s = float(starts["import torch"])  # type: ignore[index]
        lines += ["", "### Start-up", "",
                  "Best of 5 fresh processes each, in this run. `--version` and `--help` import no torch (nor numpy,",
                  "rich, scipy, huggingface_hub or transformers: `tests/cli/test_startup.py` checks `sys.modules`); `inspect`",
                  "reads the header only, so it costs about one `import torch`.", "",
                  "| command | s | − `import torch` s |", "| --- | ---: | ---: |"]
        for name, sec in starts.items():  # type: ignore[attr-defined]
            lines.append(f"| `{name}` | {sec} | {float(sec) - torch_s:+.3f} |")
    two = extra.get("two_core")
    if two:
        lines += ["", "### The 8B merge on two cores", "",
                  (f"Two Llama-3-8B-shaped r=16 bf16 adapters merged with {two['threads']} torch threads (a user's "  # type: ignore[index]
                  "2-core machine), best of 3, end to end; the floor is this run's I/O floor and the start-up is "
                  f"`import torch, lorakit, lorakit.cli.main` ({two['startup_s']} s)."), "",  # type: ignore[index]
                  "| method | s | peak MB | floor s | s / (floor + start-up) |", "| --- | ---: | ---: | ---: | ---: |"]
        for name in ("svd", "cat"):
            c = two[name]  # type: ignore[index]
            lines.append(f"| `{'svd --rank 16' if name == 'svd' else 'cat'}` | {c['s']} | {c['peak_rss_mb']} "
                         f"| {c['floor_s']} | {float(c['s']) / (float(c['floor_s']) + float(two['startup_s'])):.2f} |")  # type: ignore[index]
    delta_rows = [r for r in results if r.get("delta")]
    if delta_rows:
        lines += ["", "### Delta-space merges on whole adapters", "",
                  ("Two r=16 adapters, density 0.5, rank 16, end to end in a fresh process (one torch thread, like the "
                  "table above). These methods are element-wise on the dense ΔW of every module (7·10⁹ entries per "
                  "input for the 8B shape), so their floor is compute, not I/O."), "",
                  "| shape | " + " | ".join(f"{m} s | {m} peak MB" for m in DELTA_METHODS) + " |",
                  "| --- |" + " ---: | ---: |" * len(DELTA_METHODS)]
        for r in delta_rows:
            d = r["delta"]
            lines.append(f"| {r['shape']} | " + " | ".join(
                f"{d[m]['s']} | {d[m]['peak_rss_mb']}" if m in d else "- | -" for m in DELTA_METHODS) + " |")  # type: ignore[index,operator]
    peer_rows = [(r, p) for r in results for p in (r.get("peers") or {}).get("peft", [])]
    if peer_rows:
        lines += [
            "",
            "### Peers: PEFT `add_weighted_adapter` against lorakit",
            "",
            "PEFT is timed in-process on the 7 projections of layer 0 (adapters already loaded into a model made of",
            "just those Linear layers, so its time excludes loading and saving) and extrapolated by the layer count;",
            "`lorakit e2e` is the whole adapter end to end in a fresh process (load, merge, save). PEFT's `svd`/",
            "`*_svd` methods form the dense ΔW and take a full SVD per module; `ties_svd`/`dare_ties_svd` run at",
            "density 0.5 and rank 16, lorakit's `ties`/`dare_ties` likewise.",
            "",
            "The `lorakit layer 0` column is lorakit's in-process merge of the same layer-0 modules, timed the way",
            "PEFT is (the driver of `benchmarks/merge.py`; not run for `cat`, whose driver call asks for a rank).",
            "End to end, lorakit's `ties`/`dare_ties` are the whole-adapter runs of the table above. The error",
            "columns are the mean over layer 0's modules of ‖result − target‖/‖target‖ at rank 16, each against",
            "its own tool's dense method (PEFT: its dense TIES; lorakit: its exact TIES/DARE matrix): PEFT takes a",
            "full SVD, the best possible at that rank, so lorakit's randomized SVD matches it when the two agree.",
            "The PEFT driver folds each file's scale into lora_B (PEFT scaling 1), so both tools merge the same",
            "ΔW; PEFT's `dare_ties_svd` error is measured against its dense TIES (DARE's random mask has no",
            "shared target).",
            "",
            ("| shape | rank | method | PEFT layer 0 s | lorakit layer 0 s | PEFT / lorakit (layer 0) "
            "| PEFT error | lorakit error "
            "| PEFT whole adapter s (×layers) | lorakit e2e s | PEFT / lorakit e2e | PEFT peak MB "
            "| lorakit e2e peak MB |"),
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]

        def cell(x: object) -> str:
            return "-" if x is None else str(x)

        for r, p in peer_rows:
            lines.append(f"| {r['shape']} | {r['rank']} | {p['method']} | {p['peft_layer0_s']} "
                         f"| {cell(p['lorakit_layer0_s'])} | {cell(p['peft_over_lorakit_layer0'])} "
                         f"| {cell(p.get('peft_mean_error'))} | {cell(p.get('lorakit_mean_error'))} "
                         f"| {p['peft_full_s']} | {cell(p['lorakit_e2e_s'])} | {cell(p['peft_over_lorakit_e2e'])} "
                         f"| {p['peft_peak_rss_mb']} | {cell(p['lorakit_peak_rss_mb'])} |")
    dense_rows = [r for r in results if r.get("peers")]
    if dense_rows:
        lines += [
            "",
            "### Peer: the dense-SVD resize route (kohya's `resize_lora`: dense ΔW, full SVD, truncate)",
            "",
            "Timed on one module per distinct shape and extrapolated by the module counts (compute only, inputs",
            "loaded); lorakit's resize time above is end to end in a fresh process.",
            "",
            "| shape | rank → r/4 | dense route s | lorakit resize e2e s | dense / lorakit | max disagreement |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in dense_rows:
            p = r["peers"]
            lines.append(f"| {r['shape']} | {r['rank']} → {max(1, int(r['rank']) // 4)} | {p['dense_resize_s']} "
                         f"| {r['resize_s']} | {r['resize_over_dense']} | {p['dense_resize_max_agreement']:.1e} |")
    big = [r for r in results if r["shape"] == "llama3-70b"]
    lines += ["", "### Memory of the 70B-shaped merge", ""]
    if big:
        lines += [(f"The fixed memory cost of a merge, measured as a whole `lorakit merge --method svd` of the two "
                  f"bundled example adapters, is {tiny_rss:.0f} MB resident (start-up alone: {base_rss:.0f} MB). "
                  "On CPU the merge holds one module at a time, with one more read ahead."), ""]
        for r in big:
            above = float(r["merge_peak_rss_mb"]) - tiny_rss
            module = float(r["largest_module_inputs_mb"])
            lines.append(
                f"- {r['adapters']} r={r['rank']} adapters ({r['modules']} modules, {r['input_mb']} MB of inputs): "
                f"peak {r['merge_peak_rss_mb']} MB, {above:.0f} MB above a tiny merge, which is {above / module:.1f}× "
                f"the largest module's input factors ({module} MB, bf16, all inputs) or "
                f"{above / (2 * module):.1f}× them in float32.")
        lines += ["", ("Across every case, the memory above a tiny merge follows the size of the largest module, not the "
                  "size of the adapter:"), "",
                  "| shape | rank | adapters | inputs MB | largest module MB | above a tiny merge MB | ÷ largest module |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in results:
            above = float(r["merge_peak_rss_mb"]) - tiny_rss
            module = float(r["largest_module_inputs_mb"])
            lines.append(f"| {r['shape']} | {r['rank']} | {r['adapters']} | {r['input_mb']} | {module} | {above:.0f} "
                         f"| {above / module:.1f} |")
    else:
        lines.append("Not run in this invocation.")
    cost = extra.get("cost_table")
    if cost:
        lines += ["", "### Cost table: 2, 4, 8 adapters × rank 16/64 × 8B/70B shapes", "",
                  (f"End to end in fresh processes ({extra.get('cost_table_threads', 1)} torch thread(s) each; "
                  + (f"load average {' / '.join(f'{x:.1f}' for x in extra['cost_table_loadavg'])} at start/end, "
                     f"{extra.get('cost_table_minutes', '?')} min" if extra.get("cost_table_loadavg")
                     else "within the run above") + "), `lorakit merge --method M` (`svd`: to the largest "
                  "input rank; `ties`/`dare` = `dare_ties`: density 0.5, rank 16; `lego`: its defaults) and `lorakit "
                  "resize` of one input to rank/4. A number marked * was measured on the first `layers timed` "
                  "layers and extrapolated as start-up + (measured − start-up) × layers / layers timed (every layer "
                  "has the same modules); the measured time is beside it."), "",
                  "| shape | rank | adapters | method | whole adapter s | measured s | layers timed | peak MB |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        for c in cost:  # type: ignore[attr-defined]
            sampled = int(c["layers_timed"]) < int(c["layers"])
            whole = c.get("whole_s", "failed: " + str(c.get("failed")))
            lines.append(f"| {c['shape']} | {c['rank']} | {c['adapters']} | {c['method']} | {whole}{'*' if sampled and 'whole_s' in c else ''} "
                         f"| {c.get('measured_s', '-')} | {c['layers_timed']}/{c['layers']} | {c['peak_rss_mb']} |")
    lines += ["", "### Left out of this run", "",
              "Cases not run (to keep the record under ~15 minutes on 2 shared cores): "
              + ", ".join(f"{s} r={r} ×{n}" for s, r, n in LEFT_OUT) + ". Peers run on "
              + ", ".join(PEER_SHAPES) + " shapes only: on 8B shapes PEFT's dense SVDs (14336×4096) and the dense "
              "resize take tens of minutes single-threaded."
              + ("" if device.startswith("cuda") else " This run is CPU only: the GPU half of the record "
                 "(`--device cuda`) is measured on a machine with one; see docs/performance.md.")]
    return "\n".join(lines) + "\n"


def _extra(rec: dict[str, object]) -> dict[str, object]:
    keys = ("startup", "two_core", "cost_table", "cost_table_threads", "cost_table_loadavg", "cost_table_minutes")
    return {k: rec[k] for k in keys if rec.get(k)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the small cases")
    ap.add_argument("--cases", help="comma-separated shape names to run")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda, for every lorakit run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: fair on a shared box)")
    ap.add_argument("--no-peers", action="store_true", help="skip PEFT and the dense resize route")
    ap.add_argument("--peers-on", default=",".join(PEER_SHAPES),
                    help="comma-separated shapes whose 2-adapter cases also run the peers (default: %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the generated adapters in bench-out/perf")
    ap.add_argument("--no-delta", action="store_true", help="skip the whole-adapter TIES/DARE/DELLA/prune runs")
    ap.add_argument("--cost-table", action="store_true",
                    help="also run the cost table (2/4/8 adapters × r16/r64 × 8B/70B × svd, cat, ties, dare, lego, "
                         "resize; heavy methods sampled on the first layers); --cost-table-only runs just that")
    ap.add_argument("--cost-table-only", action="store_true",
                    help="run only the cost table and add it to the existing docs/benchmarks/perf.json and perf.md")
    ap.add_argument("--from-json", action="store_true",
                    help="only rewrite docs/benchmarks/perf.md from the numbers in docs/benchmarks/perf.json")
    ap.add_argument("--delta-stages", action="store_true",
                    help="only print the delta methods' CPU ns per entry by stage on one 8B gate_proj and q_proj, best of 3")
    args = ap.parse_args(argv)
    PEER_SHAPES[:] = args.peers_on.split(",")
    if args.delta_stages:
        torch.set_num_threads(args.threads)
        print(json.dumps(delta_stage_profile(), indent=1))
        return
    if args.from_json:
        rec = json.loads((DOCS / "perf.json").read_text())
        SETTINGS.update(threads=str(rec["threads"]))
        (DOCS / "perf.md").write_text(markdown(rec["results"], rec["baseline_rss_mb"], rec["command"], rec["loadavg"],
                                               rec["device"], rec["startup_s"], rec["tiny_merge_rss_mb"],
                                               _extra(rec)))
        return
    from lorakit.device import resolve_device

    device = str(resolve_device(args.device))
    SETTINGS.update(device=device.split(":")[0], threads=str(args.threads))
    torch.set_num_threads(args.threads)
    cases = QUICK if args.quick else CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c[0] in wanted]
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    base_s, base = baseline()
    if args.cost_table_only:
        rec = json.loads((DOCS / "perf.json").read_text())
        rec["cost_table"] = cost_table(base_s)
        rec["cost_table_loadavg"] = [load0, os.getloadavg()[0]]
        rec["cost_table_minutes"] = round((time.perf_counter() - t_start) / 60, 1)
        rec["cost_table_threads"] = SETTINGS["threads"]
        (DOCS / "perf.json").write_text(json.dumps(rec, indent=2) + "\n")
        main(["--from-json"])
        return
    tiny_rss = tiny_merge_rss()
    extra: dict[str, object] = {"startup": startup_costs(), "two_core": two_core_8b()}
    print(extra, flush=True)
    results = []
    for case in cases:
        print(f"running {case} ...", flush=True)
        r = run_case(*case, with_peers=not args.no_peers, with_delta=not args.no_delta)
        print(r, flush=True)
        results.append(r)
    if args.cost_table:
        load_ct, t_ct = os.getloadavg()[0], time.perf_counter()
        extra["cost_table"] = cost_table(base_s)
        extra.update(cost_table_loadavg=[load_ct, os.getloadavg()[0]], cost_table_threads=SETTINGS["threads"],
                     cost_table_minutes=round((time.perf_counter() - t_ct) / 60, 1))
    loadavg = [load0, os.getloadavg()[0]]
    command = "python -m benchmarks.perf" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    # Only a full run is the record; a partial one (--quick, --cases, --no-peers) must not overwrite it.
    dest = DOCS if not (args.quick or args.cases or args.no_peers or args.no_delta) else OUT / "perf-partial"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "perf.json").write_text(json.dumps(
        {"machine": machine(), "device": device, "versions": versions(), "threads": args.threads,
         "loadavg": loadavg, "baseline_rss_mb": base, "tiny_merge_rss_mb": tiny_rss, "startup_s": base_s, "command": command, "left_out": LEFT_OUT,
         "minutes": round((time.perf_counter() - t_start) / 60, 1), "results": results, **extra}, indent=2) + "\n")
    (dest / "perf.md").write_text(markdown(results, base, command, loadavg, device, base_s, tiny_rss, extra))
    if not args.keep:
        shutil.rmtree(OUT / "perf", ignore_errors=True)
    print((dest / "perf.md").read_text())
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
