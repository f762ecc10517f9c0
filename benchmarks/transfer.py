"""End-to-end Trans-LoRA experiment with two tiny causal LMs pre-trained here on a synthetic corpus.

    .venv/bin/python -m benchmarks.transfer            # CPU, small; bases cached in bench-out/transfer/
    .venv/bin/python -m benchmarks.transfer --scale large --device cuda   # the larger GPU variant

Corpus (:func:`lorakit.transfer.tiny.corpus_doc`): documents of 4 ``Q: x\nA: y\n`` examples of one task drawn
from copy, reverse, sort, uppercase (letter strings) and addition. Asked zero-shot (``Q: x\nA: `` with no
examples) a base cannot know which task is meant. The LoRA task ``first-letter`` (not in pre-training) answers the
first letter of a lower-case word of length 3-6. Source: GPT-2 architecture; target:
Llama architecture of another size. The transfer sees only the kit (5 seeds + discriminator); accuracy is
exact match on held-out task inputs, greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import string
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.device import resolve_device
from lorakit.transfer import pipeline
from lorakit.transfer.models import apply_adapter, greedy, load_causal_lm, render
from lorakit.transfer.student import train_student
from lorakit.transfer.tiny import char_tokenizer, pretrain, random_word, save_base, tiny_model
from lorakit.transfer.train import TrainConfig, train_lora

OUT = Path("bench-out/transfer")
LOWER = string.ascii_lowercase

PREAMBLE = """Produced by `benchmarks/transfer.py` (see its docstring for the corpus and the task). Each section
is one run of the script; numbers are as measured. The transfer sees only the kit (5 seed examples and the
discriminator); the student can at best learn what the teacher (source + LoRA) answers, so "source + LoRA" is
the transfer's ceiling, and "target + LoRA trained on real data" is the reference it is measured against.
"""

SCALES = {
    "small": {"source": ("gpt2", 48, 2, 4), "target": ("llama", 64, 2, 4), "steps": 2000, "batch": 16,
              "train": 256, "test": 100, "samples": 256, "negatives": 128},
    "large": {"source": ("gpt2", 256, 4, 8), "target": ("llama", 384, 4, 8), "steps": 6000, "batch": 64,
              "train": 1024, "test": 500, "samples": 1024, "negatives": 512},
}


def task_example(rng: random.Random) -> tuple[str, str]:
    w = random_word(rng)
    return w, w[0]


def pretrain_base(arch: tuple[str, int, int, int], steps: int, batch: int, seed: int, device: torch.device,
                  path: Path) -> float:
    """Pre-train one tiny base on the synthetic corpus and save it to ``path``; returns seconds."""
    kind, hidden, layers, heads = arch
    tok = char_tokenizer()
    model = tiny_model(kind, hidden=hidden, layers=layers, heads=heads, seed=seed)
    t0 = time.perf_counter()
    loss = pretrain(model, tok, steps=steps, batch=batch, seed=seed, lr=5e-3, device=device, log_every=100)
    secs = time.perf_counter() - t0
    save_base(model.cpu().eval(), tok, path)
    (path / "pretrain.json").write_text(json.dumps({"steps": steps, "batch": batch, "seconds": secs,
                                                     "final_loss": loss}))
    return secs


def accuracy(model, tok, data: list[tuple[str, str]]) -> float:
    preds = greedy(model, tok, [render(x) for x, _ in data], max_new_tokens=12)
    return sum(p == y for p, (_, y) in zip(preds, data)) / len(data)


def evaluate(spec: str, adapter: lorakit.Adapter | None, data, device) -> float:
    model, tok = load_causal_lm(spec, device)
    if adapter is not None:
        apply_adapter(model, adapter)
    return accuracy(model, tok, data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=list(SCALES), default="small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reverse", action="store_true",
                    help="Swap the roles: transfer from the Llama base to the GPT-2 base.")
    ap.add_argument("--pretrain-only", choices=["source", "target"], default=None,
                    help="Pre-train (and cache) one base, then stop: run both in parallel on 2 cores.")
    ap.add_argument("--write-docs", default="docs/benchmarks/transfer.md")
    args = ap.parse_args()
    # One thread: on a loaded 2-core machine two OpenMP threads run these tiny kernels ~15× slower.
    torch.set_num_threads(1)
    dev = resolve_device(args.device)
    sc = SCALES[args.scale]
    root = OUT / args.scale
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    bases = {}
    for role, seed in (("source", 1), ("target", 2)):
        if args.pretrain_only and role != args.pretrain_only:
            continue
        arch = sc[role]
        path = root / f"{role}-{arch[0]}-{arch[1]}"
        if not (path / "pretrain.json").exists():
            pretrain_base(arch, sc["steps"], sc["batch"], seed, dev, path)
        timings[f"pretrain {role}"] = json.loads((path / "pretrain.json").read_text())["seconds"]
        bases[role] = str(path)
    if args.pretrain_only:
        return
    arch_of = {"source": sc["source"], "target": sc["target"]}
    if args.reverse:
        bases = {"source": bases["target"], "target": bases["source"]}
        arch_of = {"source": sc["target"], "target": sc["source"]}
        root = root / "reverse"
        root.mkdir(exist_ok=True)

    rng = random.Random(args.seed + 100)
    train = [task_example(rng) for _ in range(sc['train'])]
    test_rng = random.Random(10_000 + args.seed)
    test = [task_example(test_rng) for _ in range(sc['test'])]
    data = root / "first-letter.jsonl"
    data.write_text("".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in train))
    # tiny models need a larger learning rate than the paper's 2e-5..2e-4 for 7B models
    lora_cfg = TrainConfig(rank=16, alpha=32, epochs=30, lr=1e-2, batch_size=16, seed=args.seed)

    def direct(spec: str) -> lorakit.Adapter:
        m, t = load_causal_lm(spec, dev)
        return train_lora(m, t, [(render(x), y + "\n") for x, y in train], lora_cfg, device=dev,
                          base_model_name=spec)

    t0 = time.perf_counter()
    src_lora = direct(bases["source"])
    timings["source LoRA (real data)"] = time.perf_counter() - t0
    lorakit.save(src_lora, root / "source-lora", format="peft")
    t0 = time.perf_counter()
    tgt_direct = direct(bases["target"])
    timings["target LoRA (real data)"] = time.perf_counter() - t0

    kit = root / "kit"
    import shutil
    shutil.rmtree(kit, ignore_errors=True)
    t0 = time.perf_counter()
    prep = pipeline.prepare(root / "source-lora", bases["source"], data, kit, seeds=5, negatives=sc['negatives'],
                            disc_config=TrainConfig(rank=16, alpha=32, epochs=10, lr=8e-3, seed=args.seed),
                            device=str(dev), seed=args.seed)
    timings["prepare (discriminator)"] = time.perf_counter() - t0

    # as in Trans-LoRA, |D_syn| = |D| and the student trains like the direct baseline (same budget)
    student_cfg = lora_cfg
    results = {}
    for label, use_filter in (("transfer", True), ("unfiltered", False)):
        out = root / f"run-{label}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        rep = pipeline.run(kit, bases["source"], bases["target"], out, samples=sc['samples'],
                           use_filter=use_filter, student_config=student_cfg, device=str(dev), seed=args.seed)
        timings[f"run ({label})"] = time.perf_counter() - t0
        results[label] = (lorakit.load(out / "adapter"), rep.summary)

    seeds = [(r["input"], r["output"]) for r in map(json.loads, (kit / "seeds.jsonl").read_text().splitlines())]
    m, t = load_causal_lm(bases["target"], dev)
    seeds_only = train_student(m, t, [x for x, _ in seeds] * 20, [y for _, y in seeds] * 20, student_cfg,
                               device=dev)

    acc = {
        "source + LoRA": evaluate(bases["source"], src_lora, test, dev),
        "target alone": evaluate(bases["target"], None, test, dev),
        "target + transferred LoRA (filtered)": evaluate(bases["target"], results["transfer"][0], test, dev),
        "target + LoRA trained on real data": evaluate(bases["target"], tgt_direct, test, dev),
        "ablation: unfiltered synthetic": evaluate(bases["target"], results["unfiltered"][0], test, dev),
        "ablation: 5 seeds only": evaluate(bases["target"], seeds_only, test, dev),
    }
    # the synthetic data itself: share of accepted inputs that are valid task inputs (lower-case, length 3-6)
    def valid(x: str) -> bool:
        return 3 <= len(x) <= 6 and all(c in LOWER for c in x)

    syn = {}
    for label in ("transfer", "unfiltered"):
        rows = [json.loads(l) for l in (root / f"run-{label}" / "teacher.jsonl").read_text().splitlines()]
        syn[label] = {"valid_inputs": sum(valid(r["input"]) for r in rows) / len(rows),
                      "teacher_correct": sum(r["output"] == r["input"][:1] for r in rows) / len(rows),
                      "acceptance_rate": results[label][1]["acceptance_rate"]}
    gap = acc["target + LoRA trained on real data"] - acc["target alone"]
    rec = (acc["target + transferred LoRA (filtered)"] - acc["target alone"]) / gap if gap > 0 else float("nan")

    lines = ["| configuration | accuracy |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in acc.items()]
    lines += ["", f"Gap recovered by the transfer: {rec:.1%} of (direct − target alone).", "",
              "| synthetic set | acceptance rate | valid task inputs | teacher labels correct |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['acceptance_rate']:.3f} | {v['valid_inputs']:.3f} | {v['teacher_correct']:.3f} |"
              for k, v in syn.items()]
    lines += ["", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", f"Discriminator (on its own training data): accepts {prep.summary['discriminator_accepts_real']:.3f}"
              f" of real inputs, rejects {prep.summary['discriminator_rejects_generated']:.3f} of source-generated."]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        import peft
        import transformers
        direction = f"{arch_of['source'][0]}-{arch_of['source'][1]} → {arch_of['target'][0]}-{arch_of['target'][1]}"
        header = (f"## Trans-LoRA on tiny models: {direction} ({args.scale}, {dev.type})\n\n"
                  f"Command: `.venv/bin/python -m benchmarks.transfer --scale {args.scale} --device {args.device}"
                  f"{' --reverse' if args.reverse else ''}`"
                  f"  \nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
                  f"threads ({'2-core shared CPU, other agents running' if dev.type == 'cpu' else dev}); "
                  f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                  f"Python {platform.python_version()}.  \n"
                  f"Source: {arch_of['source'][0]} hidden {arch_of['source'][1]}, {arch_of['source'][2]} layers; "
                  f"target: {arch_of['target'][0]} hidden {arch_of['target'][1]}, {arch_of['target'][2]} layers; "
                  f"each pre-trained "
                  f"{sc['steps']} steps × {sc['batch']} documents. Task `first-letter`; {sc['train']} real "
                  f"examples for the source LoRA and the direct baseline; the transfer sees 5 seeds; N = "
                  f"{sc['samples']} synthetic inputs; {sc['test']} test inputs, exact match, greedy, zero-shot.\n\n")
        doc = Path(args.write_docs)
        doc.parent.mkdir(parents=True, exist_ok=True)
        # one section per (direction, scale, device): replace ours, keep the others
        sections = doc.read_text().split("\n## ")[1:] if doc.exists() else []
        title = header.splitlines()[0][3:]
        sections = [x for x in sections if x.splitlines()[0] != title] + [(header + table)[3:]]
        doc.write_text("# Cross-model transfer benchmark\n\n" + PREAMBLE + "\n## " + "\n\n## ".join(
            x.rstrip("\n") for x in sections) + "\n")


if __name__ == "__main__":
    main()
