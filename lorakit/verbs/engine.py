"""The steps the verbs share, written once: the module loop, and the write of an adapter with its provenance.

A verb plans from headers and computes its output adapter (lazily, module by module); :func:`write_adapter`
then records what was done (:func:`lorakit.provenance.make_provenance`: operation, parameters, inputs with their
sha256) and writes the adapter atomically through :func:`lorakit.verbs.store.save`, which refuses an output that
is one of the inputs before anything is written. ``merge``, ``resize``, ``convert``, ``extract`` and
``dequantize`` write through it; the writers of other file kinds (quantized files, checkpoints, LQ-LoRA
residuals) keep their own ``io`` writer.

:class:`ModuleStream` is the module loop every verb that loops over modules goes through: a verb gives the module
order, how one module's inputs are read, and the work over a window of modules; the stream reads ahead in a
background thread, cuts the windows, hands each module's result out once, trims the host heap as it goes, and
reports progress. A lazy output adapter pulls its modules from it (``stream.get``), an eager verb iterates it;
:func:`streamed` wraps an adapter whose per-module work is the read itself, :func:`windowed` hands each window to the work as a lazy adapter. Through it:

- ``merge`` (:func:`lorakit.pipeline.run_merge`, batched windows for an operator with a ``batched`` path),
  ``resize`` (its spectra planning pass and the resize), ``quantize``, ``extract``, ``apply``, ``lq-decompose``
  (the decomposition and the ``--budget`` cost table), :func:`lorakit.verbs.lego.lego_merge`;
- ``convert`` and ``dequantize`` (:func:`streamed`), ``similarity`` (:func:`lorakit.verbs.similarity.similarity`),
  ``inspect --spectrum`` / ``--norms`` (:mod:`lorakit.verbs.inspect`) and ``transfer project``
  (:func:`lorakit.transfer.pipeline.project_adapter`).

Not through it, because they do not loop over modules: ``inspect`` without ``--norms``/``--spectrum`` (headers
only), the hub verbs ``pull``, ``push``, ``search`` (files and Hub API calls; no module's tensors are read),
``transfer prepare`` / ``transfer run`` (loops over training data; their fold of an adapter into a live torch model
is not a streamed output) and ``merge --list-methods``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from lorakit.adapter import Adapter, ModuleInfo
from lorakit.factors import LoraFactors
from lorakit.provenance import make_provenance
from lorakit.verbs.store import save


@dataclass(frozen=True)
class Output:
    """Where and how a verb's adapter is written.

    Attributes:
        path: output file or directory.
        operation: the provenance's operation name (``"merge"``, ``"resize"``...).
        params: the provenance's parameters (JSON-able).
        inputs: input paths: refused as outputs, and (with ``hash_inputs``) hashed into the provenance.
        format: output format (``None``: the adapter's source format when writable, else PEFT).
        hash_inputs: record the inputs' sha256 in the provenance (``False`` for inputs named only by their
            parameters, such as extract's checkpoints).
    """

    path: str | Path
    operation: str
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[str | Path, ...] = ()
    format: str | None = None
    hash_inputs: bool = True


def write_adapter(adapter: Adapter, out: Output) -> Path:
    """Write ``adapter`` atomically to ``out.path`` with its provenance; returns the written path."""
    # hashed while the output is written (the safetensors writer settles the digests when it closes)
    prov = make_provenance(out.operation, out.params, list(out.inputs) if out.hash_inputs else (), background=True)
    return save(adapter, out.path, format=out.format, provenance=prov, inputs=out.inputs)


R = TypeVar("R")
T = TypeVar("T")

#: ``progress(names, total, label)`` wraps the module names as they are processed (a progress bar).
Progress = Callable[[Iterable[str], int, str], Iterator[str]]


class ModuleStream(Generic[R, T]):
    """Modules computed in ``order``, a window at a time, their inputs read ahead; each result handed out once.

    Args:
        order: the module names, in the order a writer asks for them.
        read: ``read(name)``: one module's inputs (the file read, the cast, the NaN/Inf check: the verb's
            reader names the file). Run in one background thread (:class:`~lorakit.io.prefetch.Prefetcher`),
            ahead of the work.
        work: ``work(window, inputs)``: results for the modules of ``window`` (a list of names, first the one
            asked for), reading their inputs with ``inputs(name)``. It must return the first name's result; the
            others it returns are kept until asked for, and those it leaves out start a later window.
        nbytes: a module's working size in bytes (float32 factors): the window is cut at ``window_bytes`` of
            it (:func:`~lorakit.linalg.next_window`) and the host heap is trimmed every 16 MB of it
            (:class:`~lorakit.device.HostMemoryTrimmer`).
        window_bytes: the window's size; ``0`` or ``1``: one module at a time.
        window_modules: windows of this many modules instead (``0``: cut by ``window_bytes``).
        read_ahead_bytes: inputs read ahead, by ``stored_bytes`` (at least one module is read ahead).
        read_ahead: ``False``: no background reads, each module's inputs are read when its work asks for them
            (verbs over dense checkpoint matrices, where a second matrix in memory would double the peak).
        stored_bytes: each module's stored input size, for ``read_ahead_bytes``; missing names count 0.
        progress: wraps the names when the stream is iterated, with ``label``.

    Memory: one window of results plus the inputs read ahead. A module asked for again is computed again.
    Cost: the loop adds a dict lookup per module; the work is the verb's.
    """

    def __init__(self, order: Sequence[str], read: Callable[[str], R],
                 work: Callable[[list[str], Callable[[str], R]], Mapping[str, T]], *,
                 nbytes: Callable[[str], int], window_bytes: int = 0, window_modules: int = 0,
                 read_ahead_bytes: int = 0,
                 stored_bytes: Mapping[str, int] | None = None, read_ahead: bool = True,
                 progress: Progress | None = None, label: str = "") -> None:
        from lorakit.device import HostMemoryTrimmer
        from lorakit.io.prefetch import Prefetcher

        self.order = list(order)
        self._position = {n: i for i, n in enumerate(self.order)}
        self._work = work
        self._nbytes = nbytes
        self._window_bytes = window_bytes
        self._window_modules = window_modules
        self._inputs = Prefetcher(read, self.order, stored_bytes or {}, read_ahead_bytes).get if read_ahead else read
        self._ready: dict[str, T] = {}  # results of the current window, popped as they are asked for
        self._done: set[str] = set()  # names computed: a later window does not compute them again
        self._trimmer = HostMemoryTrimmer()
        self._progress = progress
        self._label = label

    def get(self, name: str) -> T:
        """``name``'s result: from the current window, else computed with the window that starts at it."""
        from lorakit.linalg import next_window

        if name not in self._ready:
            window = next_window(self.order, self._position[name], self._nbytes, self._window_bytes, self._done,
                                 self._window_modules)
            results = self._work(window, self._inputs)
            self._ready.update(results)
            self._done.update(results)
        self._trimmer.processed(self._nbytes(name))
        return self._ready.pop(name)

    def __iter__(self) -> Iterator[tuple[str, T]]:
        """``(name, result)`` for every module in order (through ``progress`` when given)."""
        names: Iterable[str] = self.order
        if self._progress is not None:
            names = self._progress(names, len(self.order), self._label)
        for name in names:
            yield name, self.get(name)


def windowed(adapter: Adapter, work: Callable[[Adapter, list[str]], Mapping[str, T]], *, device: Any,
             window_bytes: int) -> ModuleStream[LoraFactors, T]:
    """A :class:`ModuleStream` over ``adapter``'s modules, windows of ``window_bytes`` float32 factor bytes
    (modules of equal shape then batch), ``work(view, window)`` given the window's modules as a lazy adapter
    ``view`` that reads through the stream (read ahead: half a window on CUDA, one module on CPU).

    For the verbs whose per-window work takes an adapter (resize, ``inspect --spectrum``: the batched QR cores
    of :mod:`lorakit.linalg`)."""
    from functools import partial

    infos = adapter.infos()

    def run(window: list[str], inputs: Callable[[str], LoraFactors]) -> Mapping[str, T]:
        view = Adapter({n: partial(inputs, n) for n in window}, adapter.meta, {n: infos[n] for n in window})
        return work(view, window)

    cuda = getattr(device, "type", str(device).split(":")[0]) == "cuda"
    return ModuleStream(list(adapter), adapter.__getitem__, run, nbytes=lambda n: infos[n].num_params * 4,
                        window_bytes=window_bytes, read_ahead_bytes=window_bytes // 2 if cuda else 0,
                        stored_bytes={n: i.num_params * i.dtype.itemsize for n, i in infos.items()})


def streamed(adapter: Adapter, fn: Callable[[str, LoraFactors], LoraFactors] | None = None,
             infos: Mapping[str, ModuleInfo] | None = None) -> Adapter:
    """``adapter`` (its modules through ``fn(name, factors)`` when given, described by ``infos``, default the
    input's), lazy, its modules pulled from a :class:`ModuleStream`: while a writer writes one module, the next
    is read (and decoded: a quantized file's modules are dequantized on access) in the background thread.

    For the verbs whose per-module work is the read itself (``convert``, ``dequantize``): one module at a time,
    one read ahead. Memory: two modules' factors. The metadata (passthrough tensors, whole module tensors) is
    the input's, read by the writer when it needs it.
    """
    from functools import partial

    in_infos = adapter.infos()

    def work(window: list[str], inputs: Callable[[str], LoraFactors]) -> dict[str, LoraFactors]:
        name = window[0]
        return {name: inputs(name) if fn is None else fn(name, inputs(name))}

    stream = ModuleStream(list(adapter), adapter.__getitem__, work, nbytes=lambda n: in_infos[n].num_params * 4)
    return Adapter({n: partial(stream.get, n) for n in adapter}, adapter.meta, infos or in_infos)


__all__ = ["ModuleStream", "Output", "Progress", "streamed", "windowed", "write_adapter"]
