"""The inspect verb: spectra and norms streamed through the engine (windows batched by shape, reads ahead in the
background), against dense references; the spectrum facts of one module."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from lorakit.ops.spectrum import module_spectrum
from lorakit.run import RunOptions
from lorakit.testing import random_adapter
from lorakit.verbs.inspect import inspect, module_norms, spectra, spectrum_report

from ._spy import spied

F64 = torch.float64
SHAPES = {"l0.q": (16, 12), "l0.v": (8, 12), "l1.q": (16, 12), "l1.v": (8, 12), "l1.o": (12, 16)}


def _adapter():
    return random_adapter(SHAPES, {n: 3 if n.endswith("v") else 5 for n in SHAPES}, scale=2.0, decay=0.7, seed=3)


def _windows(monkeypatch) -> list[list[str]]:
    """Record the names of every batched spectra call."""
    from lorakit import linalg

    calls: list[list[str]] = []
    real = linalg.adapter_spectra

    def recording(adapter, names=None, **kw):
        calls.append(list(names))
        return real(adapter, names, **kw)

    monkeypatch.setattr(linalg, "adapter_spectra", recording)
    return calls


def test_spectra_are_the_dense_singular_values_in_the_adapters_order():
    a = _adapter()
    got = list(spectra(a, window_bytes=0))
    assert [n for n, _ in got] == list(a)
    for n, S in got:
        ref = torch.linalg.svdvals(a[n].delta(F64))[: a.info(n).rank]
        torch.testing.assert_close(S, ref, atol=1e-6 * float(ref[0]), rtol=0)


def test_a_window_batches_its_equal_shaped_modules_to_the_same_values(monkeypatch):
    a = _adapter()
    calls = _windows(monkeypatch)
    one = dict(spectra(a, window_bytes=0))
    assert calls == [[n] for n in a]  # one module a window
    calls.clear()
    whole = dict(spectra(a, window_bytes=1 << 30))
    assert calls == [list(a)]  # one window; adapter_spectra stacks the two q, the two v inside it
    for n in a:  # a batched QR/bmm may round differently from a single one: float64 rounding, no more
        torch.testing.assert_close(whole[n], one[n], rtol=1e-14, atol=0)


def test_reads_go_ahead_in_the_background_once_each():
    reads: list[tuple[str, str]] = []
    a = spied(_adapter(), reads)
    list(spectra(a, window_bytes=0))
    module_norms(a)
    assert sorted(n for n, _ in reads) == sorted(list(SHAPES) * 2)
    assert all(t.startswith("lorakit-read") for _, t in reads)


def test_module_spectrum_facts():
    S = torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=F64)
    m = module_spectrum(S)
    assert m.values == [4.0, 2.0, 1.0, 0.0] and m.smallest == 0.0 and m.leading == "4, 2, 1, 0"
    p = torch.tensor([4.0, 2.0, 1.0]) / 7
    assert m.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert (m.rank_90, m.rank_99) == (2, 3)  # energy 16/21 < 0.9 ≤ 20/21 < 0.99 ≤ 21/21
    empty = module_spectrum(torch.zeros(0, dtype=F64))
    assert empty.values == [] and empty.smallest == 0.0 and empty.effective_rank == 0.0


def test_spectrum_report_rows_and_totals():
    a = _adapter()
    rep = spectrum_report(a, full=True)
    assert [r[0] for r in rep.rows] == list(a)
    kept = 0
    for name, rank, eff, r90, r99, lead, smin, values in rep.rows:
        m = module_spectrum(dict(spectra(a))[name])
        assert (rank, eff, r90, r99, lead, smin, values) == (a.info(name).rank, round(m.effective_rank, 3),
                                                             m.rank_90, m.rank_99, m.leading, m.smallest, m.values)
        kept += r90 * sum(a.info(name).shape)
    assert rep.summary == {"module_count": 5, "parameters": a.num_params, "parameters_at_90pct_energy": kept}
    assert "singular_values" not in spectrum_report(a).columns


def test_inspect_norms_are_the_dense_norms(tmp_path):
    a = _adapter()
    src = tmp_path / "a.safetensors"
    lorakit.save(a, src, format="peft")
    norms = module_norms(a)
    assert list(norms) == list(a)
    for n in a:
        assert norms[n] == pytest.approx(float(a[n].delta(F64).norm()), rel=1e-6)
    rep = inspect(src, norms=True, run=RunOptions.resolve("cpu"))
    assert rep.columns[-1] == "norm"
    assert rep.summary["total_norm"] == pytest.approx(math.sqrt(sum(v * v for v in norms.values())), rel=1e-6)
    plain = inspect(src, run=RunOptions.resolve("cpu"))
    assert "norm" not in plain.columns and "total_norm" not in plain.summary
    assert inspect(src, spectrum=True, run=RunOptions.resolve("cpu")).title == f"spectrum of {src}"
