"""``lorakit inspect``: the header facts of an adapter (:func:`lorakit.describe.describe`), and with ``--norms``
or ``--spectrum`` the per-module reductions that read the tensors, streamed through the engine's module loop
(:class:`~lorakit.verbs.engine.ModuleStream`: the next modules read ahead while the current window computes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from lorakit.adapter import Adapter
from lorakit.linalg import default_window_bytes
from lorakit.report import Report
from lorakit.run import RunOptions, run_options
from lorakit.verbs.engine import ModuleStream, windowed
from lorakit.verbs.store import load


def spectra(adapter: Adapter, *, device: torch.device | str = "cpu",
            window_bytes: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module, singular values of its ΔW)`` (descending, float64, on CPU), in the adapter's order, streamed.

    A :class:`~lorakit.verbs.engine.ModuleStream` over the modules, a window of ``window_bytes`` float32 factor
    bytes at a time (default :func:`~lorakit.linalg.default_window_bytes`: one module on CPU, 512 MiB on CUDA);
    the equal-shaped modules of a window go through one batched QR-core SVD
    (:func:`~lorakit.linalg.adapter_spectra`), while the next modules are read in the background. Memory: one
    window of factors; cost O((out + in)·r² + r³) per module, no dense ΔW.
    """
    from lorakit.linalg import adapter_spectra

    dev = torch.device(device)
    window_bytes = default_window_bytes(dev) if window_bytes is None else window_bytes
    stream = windowed(adapter, lambda view, window: dict(adapter_spectra(view, window, device=dev)), device=dev,
                      window_bytes=window_bytes)
    yield from stream


def module_norms(adapter: Adapter) -> dict[str, float]:
    """Module → ``‖ΔW‖_F`` (factored, exact: :meth:`LoraFactors.norm`), streamed one module at a time with the
    next module read ahead."""

    def work(window: list[str], inputs) -> dict[str, float]:
        return {window[0]: inputs(window[0]).norm()}

    infos = adapter.infos()
    return dict(ModuleStream(list(adapter), adapter.__getitem__, work, nbytes=lambda n: infos[n].num_params * 4))


def spectrum_report(adapter: Adapter, *, device: torch.device | str = "cpu", full: bool = False,
                    window_bytes: int | None = None) -> Report:
    """One row per module: rank, effective rank, ranks for 90%/99% energy, σ₁…σ_4, σ_min; with ``full``
    (the JSON report) a last column holds every singular value. Summary: module count, parameters, and the
    parameters a rank keeping 90% of each module's energy would take."""
    from lorakit.ops.spectrum import module_spectrum

    report = Report(
        title=f"spectrum of {adapter.meta.source_path or 'adapter'}",
        columns=["module", "rank", "eff. rank", "rank 90%", "rank 99%", "σ (leading)", "σ min"] + (["singular_values"] if full else []),
    )
    total_params = kept90 = 0
    for name, S in spectra(adapter, device=device, window_bytes=window_bytes):
        info = adapter.info(name)
        m = module_spectrum(S)
        report.add_row(name, info.rank, round(m.effective_rank, 3), m.rank_90, m.rank_99, m.leading, m.smallest,
                       *([m.values] if full else []))
        total_params += info.num_params
        kept90 += m.rank_90 * (info.out_features + info.in_features)
    report.summary = {
        "module_count": len(report.rows),
        "parameters": total_params,
        "parameters_at_90pct_energy": kept90,
    }
    return report.finish(inputs=[adapter])


def inspect(source: str | Path, *, norms: bool = False, spectrum: bool = False, full: bool = False,
            allow_pickle: bool = False, arch: str | None = None, base: str | None = None,
            run: RunOptions | None = None) -> Report:
    """``lorakit inspect``: the header report (:func:`~lorakit.describe.describe`, with ``‖ΔW‖_F`` per module
    when ``norms``), or with ``spectrum`` the spectrum report (every singular value when ``full``).

    ``run``: the device of the spectra and their window (resolved first: ``cuda`` without a GPU fails before
    any reading)."""
    from lorakit.describe import describe

    run = run_options(run)
    adapter = load(source, allow_pickle=allow_pickle, arch=arch, base=base)
    if spectrum:
        return spectrum_report(adapter, device=run.device, full=full, window_bytes=run.window_bytes)
    return describe(adapter, norms=module_norms(adapter) if norms else None)


__all__ = ["inspect", "module_norms", "spectra", "spectrum_report"]
