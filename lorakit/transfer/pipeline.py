"""Trans-LoRA as a staged, resumable pipeline: ``prepare`` (source side, while the data exists) and ``run``
(generate → filter → teach → distil on the target).

Each stage writes its artifact into the run directory when it (or one of its rounds/epochs) finishes, so a run
that is interrupted continues where it stopped when started again with the same parameters; stages share the
seed, so a resumed run ends with the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lorakit import __version__
from lorakit.adapter import Adapter
from lorakit.errors import FormatError, IncompatibleAdaptersError, LorakitError, OutputError
from lorakit.factors import LoraFactors
from lorakit.io.atomic import atomic_output, check_output_path
from lorakit.provenance import make_provenance
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.transfer.discriminator import Discriminator, accept, calibrate_threshold, train_discriminator
from lorakit.transfer.generator import Generator
from lorakit.transfer.kit import Kit, RunState, read_examples, read_jsonl, write_json, write_jsonl
from lorakit.transfer.models import (
    apply_adapter,
    check_fits,
    fingerprint,
    load_causal_lm,
    resolve_target_modules,
)
from lorakit.transfer.student import train_student
from lorakit.transfer.teacher import Teacher
from lorakit.transfer.train import TrainConfig
from lorakit.verbs import store
from lorakit.verbs.engine import ModuleStream

#: the models that write the synthetic inputs at transfer time, taking turns by round (see :func:`run`)
DEFAULT_GENERATORS = ("target", "source")

#: ``progress(stage, completed, total)``: called as work advances (stages: generate, filter, teacher, student).
Progress = Callable[[str, int, int], None]


def _noop(stage: str, done: int, total: int) -> None:
    return None


def choose_seeds(examples: list[tuple[str, str]], k: int, seed: int) -> list[tuple[str, str]]:
    """``k`` examples drawn without replacement under ``seed``."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order[:k]]


def _hold_out(items: list[str], seed: int) -> tuple[list[str], list[str]]:
    """(train, held): a random quarter of ``items`` (at most 256) held out; both all of them below 4 items."""
    k = min(256, len(items) // 4)
    if k == 0:
        return items, items
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[k:]], [items[i] for i in order[:k]]


def prepare(
    adapter: str | Path,
    base: str,
    data: str | Path,
    output: str | Path,
    *,
    seeds: int = 5,
    seeds_file: str | Path | None = None,
    task: str | None = None,
    negatives: int = 128,
    generation_round: int = 64,
    disc_config: TrainConfig | None = None,
    run: RunOptions | None = None,
    seed: int = 0,
    recall: float = 0.9,
    progress: Progress = _noop,
) -> Report:
    """Build a transfer kit for ``adapter`` (trained on ``base``) from the task data ``data``.

    Steps: pick ``seeds`` seed examples (or read ``seeds_file``); sample ``negatives`` inputs with the *source*
    model from the seeds; train the discriminator LoRA on the source (real inputs → yes, generated → no) on
    three quarters of each; on the held-out quarter, set the accept threshold τ ≤ 0 so that at least ``recall``
    of the real inputs pass (τ = 0, the paper's p(yes) > p(no), when they already do; ``recall=0`` keeps it);
    write the kit (layout in :mod:`lorakit.transfer.kit`) atomically.
    """
    dev = run_options(run).device
    out = check_output_path(output, [adapter, data])
    if seeds < 1:
        raise LorakitError(f"--seeds must be at least 1 (got {seeds})")
    if not 0.0 <= recall <= 1.0:
        raise LorakitError(f"--recall must lie in [0, 1] (got {recall})")
    examples = read_examples(data)
    if seeds_file is not None:
        seed_examples = read_examples(seeds_file)
        if len(seed_examples) < seeds:
            raise FormatError(f"the seeds file has {len(seed_examples)} examples, fewer than the {seeds} asked",
                              file=seeds_file, hint=f"add examples or pass --seeds {len(seed_examples)}")
        seed_examples = seed_examples[:seeds]
    else:
        if len(examples) < seeds:
            raise FormatError(f"the task data has {len(examples)} examples, fewer than the {seeds} seeds asked",
                              file=data, hint=f"pass --seeds {len(examples)} or give more data")
        seed_examples = choose_seeds(examples, seeds, seed)
    task = task or Path(data).stem
    lora = store.load(adapter)
    model, tok = load_causal_lm(base, dev)
    check_fits(model, lora, label=f"base {base}")
    fp = fingerprint(model)

    gen = Generator(model, tok, name="source")
    fake: list[str] = []
    rounds = 0
    while len(fake) < negatives and rounds < max(8, 4 * negatives // generation_round + 4):
        fake.extend(gen.generate(seed_examples, generation_round, round_=rounds, seed=seed))
        rounds += 1
        progress("generate", min(len(fake), negatives), negatives)
    fake = fake[:negatives]
    real = [x for x, _ in examples]
    # a quarter of each class (at most 256) is held out: the threshold and the reported rates come from inputs
    # the discriminator did not train on (with fewer than 4 of a class, it trains and is measured on all)
    real_train, real_held = _hold_out(real, seed)
    fake_train, fake_held = _hold_out(fake, seed + 1)
    cfg = disc_config or TrainConfig(epochs=3, lr=2e-3, rank=8, alpha=16.0, seed=seed)
    disc = train_discriminator(model, tok, real_train, fake_train, task, cfg, device=dev, base_model_name=base)
    apply_adapter(model, disc)
    d = Discriminator(model, tok, task)
    odds_real, odds_fake = d.log_odds(real_held), d.log_odds(fake_held)
    threshold = calibrate_threshold(odds_real, recall)
    real_acc = float(accept(odds_real, torch.zeros_like(odds_real), threshold).double().mean())
    fake_rej = 1 - float(accept(odds_fake, torch.zeros_like(odds_fake), threshold).double().mean())
    paper_real_acc = float((odds_real > 0).double().mean())

    info = {
        "kit_version": 1, "lorakit_version": __version__, "task": task, "source_base": base,
        "source_fingerprint": fp, "num_seeds": len(seed_examples),
        "discriminator": {"negatives_from": "source", "real": len(real_train), "negatives": len(fake_train),
                          "held_out": {"real": len(real_held), "generated": len(fake_held)},
                          "train": cfg.to_json(), "recall": recall, "threshold": threshold,
                          "accepts_real": real_acc, "rejects_generated": fake_rej,
                          "accepts_real_at_zero": paper_real_acc},
    }
    with atomic_output(out, directory=True) as tmp:
        store.save(lora.with_meta(base_model=base), tmp / "adapter", format="peft",
                     provenance=make_provenance("transfer.prepare", {"part": "task adapter"}, [adapter]))
        store.save(disc, tmp / "discriminator", format="peft",
                     provenance=make_provenance("transfer.prepare", {"part": "discriminator", **info}, [data]))
        write_jsonl(tmp / "seeds.jsonl", [{"input": x, "output": y} for x, y in seed_examples])
        write_json(tmp / "kit.json", info)
    rep = Report(f"transfer kit for task {task!r} written to {out}")
    rep.summary = {"seeds": len(seed_examples), "real_inputs": len(real), "generated_negatives": len(fake),
                   "discriminator_accepts_real": real_acc, "discriminator_rejects_generated": fake_rej,
                   "discriminator_threshold": threshold, "discriminator_accepts_real_at_zero": paper_real_acc}
    rep.notes.append("the discriminator was trained on source-generated negatives only")
    if threshold < 0:
        rep.notes.append(f"p(yes) > p(no) accepted only {paper_real_acc:.0%} of held-out real inputs: the accept "
                         f"threshold was lowered to log-odds {threshold:.3g} to keep {recall:.0%} of them")
    return rep.finish(output=out, inputs=[lora])


def run(
    kit_path: str | Path,
    source_base: str,
    target_base: str,
    output: str | Path,
    *,
    samples: int = 250,
    generator: str | Sequence[str] | None = None,
    use_filter: bool = True,
    token_kl: bool = False,
    student_config: TrainConfig | None = None,
    generation_round: int = 64,
    max_rounds: int = 200,
    max_new_tokens: int = 48,
    run: RunOptions | None = None,
    seed: int = 0,
    progress: Progress = _noop,
) -> Report:
    """Transfer the kit's adapter from ``source_base`` to ``target_base``; writes ``output/adapter`` (PEFT).

    Args:
        samples: N, the number of accepted synthetic inputs (rejection sampling stops at exactly N).
        generator: the model(s) that write inputs, taking turns by round (round k uses the k mod g-th):
            ``"target"``, ``"source"`` (the clean source base) or a model path / Hub id. Default
            ``("target", "source")``; Trans-LoRA used the target alone (``"target"``). Two generators cover more
            of the input space than one: a tiny generator can write inputs of only some lengths, and a student
            with absolute positions then fails the others (see docs/transfer.md).
        use_filter: False keeps every generated input (the "unfiltered" ablation).
        token_kl: distil with token-level KL instead of sequence-level cross-entropy (same tokenizer only).
        max_rounds: give up when this many generation rounds have not produced N accepted inputs.
    """
    dev = run_options(run).device
    kit = Kit.load(kit_path)
    out = Path(output)
    check_output_path(out, [kit_path])
    if samples < 1:
        raise LorakitError(f"--samples must be at least 1 (got {samples})")
    cfg = student_config or TrainConfig(seed=seed)
    gen_names = list(DEFAULT_GENERATORS if generator is None else [generator] if isinstance(generator, str)
                     else generator)
    if not gen_names:
        raise LorakitError("no generator given", hint="pass --generator target (and/or source, or a model)")
    params = {"kit": kit.source_fingerprint, "target_base": target_base, "generator": gen_names,
              "samples": samples, "filter": use_filter, "token_kl": token_kl, "seed": seed,
              "round": generation_round, "student": cfg.to_json()}

    src, src_tok = load_causal_lm(source_base, dev)
    if fingerprint(src) != kit.source_fingerprint:
        raise IncompatibleAdaptersError(
            f"the kit's discriminator was trained on another source model ({kit.source_base}), not {source_base}",
            file=kit.path, hint="pass the --source-base the kit was prepared with, or prepare a kit for this one")
    lora = store.load(kit.adapter_path)
    check_fits(src, lora, label=f"source base {source_base}")
    tgt, tgt_tok = load_causal_lm(target_base, dev)
    resolve_target_modules(tgt, cfg.target_modules, label=f"target model {target_base}")
    if token_kl and src_tok.get_vocab() != tgt_tok.get_vocab():
        raise LorakitError("token-level KL needs the source and target to share a tokenizer",
                           hint="drop --token-kl: sequence-level distillation works across tokenizers")
    if out.exists() and not (out / "state.json").exists() and any(out.iterdir()):
        raise OutputError("the output directory exists and is not a transfer run", file=out,
                          hint="choose a new -o directory")
    state = RunState(out, params)

    # ---- generate + filter (rejection sampling until exactly N accepted) ----------------------------------
    syn_file = out / "synthetic.jsonl"
    if not state.done("synthesize"):
        t0 = time.perf_counter()
        rows = read_jsonl(syn_file)
        gens = []
        for name in gen_names:
            if name == "target":
                g_model, g_tok = tgt, tgt_tok
            else:  # the source too is loaded afresh: `src` gets the discriminator's ΔW below
                g_model, g_tok = load_causal_lm(source_base if name == "source" else name, dev)
            gens.append(Generator(g_model, g_tok, name=name, max_new_tokens=max_new_tokens))
        disc = None
        if use_filter:
            apply_adapter(src, store.load(kit.discriminator_path))
            disc = Discriminator(src, src_tok, kit.task, threshold=kit.threshold)
        accepted = sum(sum(r["accepted"]) for r in rows)
        while accepted < samples:
            k = len(rows)
            if k >= max_rounds:
                raise LorakitError(f"{max_rounds} generation rounds gave {accepted} accepted inputs of {samples}",
                                   file=out, hint="lower --samples, or raise --max-rounds (the run resumes)")
            gen = gens[k % len(gens)]
            inputs = gen.generate(kit.seeds, generation_round, round_=k, seed=seed)
            keep = disc.keep(inputs) if disc is not None else [True] * len(inputs)
            rows.append({"round": k, "generator": gen.name, "inputs": inputs, "accepted": keep})
            write_jsonl(syn_file, rows)
            accepted += sum(keep)
            progress("generate", min(accepted, samples), samples)
        state.finish("synthesize", rounds=len(rows), generated=sum(len(r["inputs"]) for r in rows),
                     accepted=accepted, seconds=time.perf_counter() - t0)
        # the discriminator's ΔW is in src: reload a clean source for the teacher
        src, src_tok = load_causal_lm(source_base, dev)
    rows = read_jsonl(syn_file)
    chosen = [x for r in rows for x, a in zip(r["inputs"], r["accepted"]) if a][:samples]

    # ---- teacher labels ------------------------------------------------------------------------------
    teach_file = out / "teacher.jsonl"
    apply_adapter(src, lora)
    if not state.done("teacher"):
        t0 = time.perf_counter()
        outputs = Teacher(src, src_tok, max_new_tokens=max_new_tokens).complete(chosen)
        progress("teacher", len(chosen), len(chosen))
        write_jsonl(teach_file, [{"input": x, "output": y} for x, y in zip(chosen, outputs)])
        state.finish("teacher", examples=len(chosen), seconds=time.perf_counter() - t0)
    labelled = read_jsonl(teach_file)

    # ---- student distillation ------------------------------------------------------------------------
    if not state.done("student"):
        t0 = time.perf_counter()
        losses: list[float] = []

        def on_step(step: int, total: int, loss: float) -> None:
            losses.append(loss)
            progress("student", step, total)

        adapter = train_student(
            tgt, tgt_tok, [r["input"] for r in labelled], [r["output"] for r in labelled], cfg, device=dev,
            checkpoint=out / "student.ckpt", teacher_model=src if token_kl else None,
            teacher_tok=src_tok if token_kl else None, on_step=on_step, base_model_name=target_base)
        prov = make_provenance("transfer.run", {**params, "source_base": source_base,
                                                "task": kit.task}, [kit.adapter_path / "adapter_model.safetensors"])
        store.save(adapter, out / "adapter", format="peft", provenance=prov)
        state.finish("student", seconds=time.perf_counter() - t0, final_loss=losses[-1] if losses else None)

    facts = state.state.get("facts", {})
    rep = Report(f"transferred {kit.task!r} from {source_base} to {target_base}: {out / 'adapter'}",
                 ["stage", "items", "seconds"])
    syn = facts.get("synthesize", {})
    rep.add_row("generate+filter", syn.get("generated"), syn.get("seconds"))
    rep.add_row("teacher", facts.get("teacher", {}).get("examples"), facts.get("teacher", {}).get("seconds"))
    rep.add_row("student", len(labelled), facts.get("student", {}).get("seconds"))
    gen_n = syn.get("generated") or 0
    rep.summary = {"accepted": len(chosen), "generated": gen_n,
                   "acceptance_rate": (syn.get("accepted", 0) / gen_n) if gen_n else None,
                   "filter": use_filter, "distillation": "token-kl" if token_kl else "sequence"}
    return rep.finish(output=out / "adapter", format="peft")


def project_adapter(
    adapter: Adapter,
    source_weight: Callable[[str], torch.Tensor],
    target_weight: Callable[[str], torch.Tensor],
    *,
    q: float = 0.5,
    null_space: bool = True,
    min_similarity: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Adapter, Report]:
    """Transfer every module of ``adapter`` by :func:`~lorakit.transfer.projection.project_module`; returns the
    new adapter (the modules kept, in memory) and a report, one row per module.

    The modules stream through the engine's loop (:class:`~lorakit.verbs.engine.ModuleStream`): the next
    module's factors are read in the background while the current one's base subspaces (one truncated SVD per
    base weight, the dominant cost) are computed. Arguments as for ``project_module``.
    """
    from lorakit.transfer.projection import COLUMNS, project_module

    infos = adapter.infos()

    def work(window: list[str], inputs) -> dict[str, tuple[LoraFactors | None, list[Any]]]:
        name = window[0]  # one module at a time: each costs two SVDs of dense base weights
        return {name: project_module(name, inputs(name), source_weight, target_weight, q=q, null_space=null_space,
                                     min_similarity=min_similarity, device=device, seed=seed)}

    kept: dict[str, LoraFactors] = {}
    report = Report("training-free transfer by subspace projection", list(COLUMNS))
    for name, (g, row) in ModuleStream(list(adapter), adapter.__getitem__, work,
                                       nbytes=lambda n: infos[n].num_params * 4):
        report.add_row(*row)
        if g is not None:
            kept[name] = g
    projected = sum(1 for r in report.rows if r[-1] == "projected")
    report.summary = {"modules_projected": projected, "modules_skipped": len(report.rows) - projected,
                      "null_space": null_space}
    report.notes.append("kept_norm = ‖ΔW_t‖_F / ‖ΔW_s‖_F per module (factored, exact)")
    return Adapter(kept, adapter.meta.with_(source_format=None)), report


def project(
    adapter: str | Path,
    source_base: str,
    target_base: str,
    output: str | Path | None,
    *,
    q: float = 0.5,
    null_space: bool = True,
    min_similarity: float = 0.0,
    run: RunOptions | None = None,
) -> Report:
    """Training-free transfer between same-shape bases (:mod:`lorakit.transfer.projection`); ``output=None``
    computes the report only."""
    from lorakit.transfer.projection import model_weights

    dev = run_options(run).device
    if output is not None:
        check_output_path(output, [adapter])
    lora = store.load(adapter)
    src, _ = load_causal_lm(source_base, "cpu")
    tgt, _ = load_causal_lm(target_base, "cpu")
    check_fits(src, lora, label=f"source base {source_base}")
    ws, wt = model_weights(src), model_weights(tgt)

    def getter(weights: Mapping[str, torch.Tensor], label: str) -> Callable[[str], torch.Tensor]:
        def get(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(label)
            return weights[name]
        return get

    result, rep = project_adapter(lora, getter(ws, "source"), getter(wt, "target"), q=q, null_space=null_space,
                                  min_similarity=min_similarity, device=dev)
    if output is not None:
        result = result.with_meta(base_model=target_base, source_format="peft")
        store.save(result, output, format=None if str(output).endswith(".safetensors") else "peft",
                     provenance=make_provenance("transfer.project", {"source_base": source_base, "target_base":
                                                target_base, "q": q, "null_space": null_space,
                                                "min_similarity": min_similarity}, [adapter]))
    # written as PEFT either way (a .safetensors path: the adapter's own format, which is PEFT here)
    return rep.finish(output=output, format=None if output is None else "peft", inputs=[lora], dry_run=output is None)
