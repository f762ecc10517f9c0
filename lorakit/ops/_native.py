"""The fused CPU loops of the delta-space merges (``_delta.c``), compiled on first use and loaded by ctypes.

Why: a TIES tile costs a dozen torch element-wise passes (~0.3-1 ns an entry each, plus their memory
traffic); the same arithmetic in one C loop over the tile costs a fraction of one pass. The C file does the
same IEEE operations in the same order as :mod:`lorakit.ops._kernels` (tested equal), so the merged ``M`` does
not depend on whether the library could be built.

Beside the loops: the skinny products of the randomized SVD and the tiles' GEMMs (:func:`mm`, :func:`mtm`,
AVX-512, 2.5× MKL on this shape; they round as any BLAS does, so the factors agree with torch's products to
float32 rounding, tested), the exact k-th largest by radix selection (:func:`kth_largest`, the same value as
``kthvalue``), and DARE's and DELLA's uniforms (:func:`uniform_`, the same values as ``torch.rand``).

The library is built once per source, compiler and CPU with the system C compiler (``$CC``, else ``cc`` /
``gcc`` / ``clang``; about 0.2 s, no Python or torch headers) into ``$LORAKIT_CACHE/native`` (default
``~/.cache/lorakit/native``), written to a temporary name and renamed into place, so concurrent processes
never load a partial file. No compiler, a failed build or ``LORAKIT_NATIVE=0`` leave :func:`library` ``None``
and the merges on their torch path. Float32 contiguous CPU tensors only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_delta.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]

_state: dict[str, ctypes.CDLL | None] = {}
_stream: dict[str, bool] = {}  # whether the C generator reproduces torch.rand (checked once)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_key() -> str:
    """The CPU's identity for ``-march=native``: a library built on one CPU may not run on another (a shared
    home directory across machines)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), platform.processor(), *lines])


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(FLAGS).encode(), _cpu_key().encode()]))
    root = Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit") / "native"
    lib = root / f"delta-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".so.part")
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, lib)
        for stale in root.glob("delta-*.so"):  # builds of earlier sources or other CPUs' flags
            if stale != lib:
                stale.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, or ``None`` where it cannot be built (the caller then takes its torch path)."""
    if "lib" not in _state:
        lib = None
        cc = _compiler()
        if os.environ.get("LORAKIT_NATIVE", "1") != "0" and cc is not None:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
            except (OSError, subprocess.SubprocessError):
                lib = None
        if lib is not None:
            i64, f32p, i64p = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p
            lib.lk_bracket_f32.restype = i64
            lib.lk_bracket_f32.argtypes = [f32p, i64, ctypes.c_float, ctypes.c_float, f32p, i64p]
            lib.lk_merge_f32.restype = i64
            lib.lk_merge_f32.argtypes = [f32p, i64, i64, i64, ctypes.c_int, f32p, f32p, f32p, i64, ctypes.c_int,
                                         f32p, i64p, f32p, f32p, ctypes.c_void_p]
            lib.lk_della_f32.restype = None
            lib.lk_della_f32.argtypes = [f32p, f32p, i64, i64, ctypes.c_float, ctypes.c_float, ctypes.c_void_p]
            lib.lk_uniform_f32.restype = None
            lib.lk_uniform_f32.argtypes = [ctypes.c_uint32, i64, ctypes.c_float, f32p]
            lib.lk_kth_largest_f32.restype = ctypes.c_float
            lib.lk_kth_largest_f32.argtypes = [f32p, i64, i64, ctypes.c_void_p]
            lib.lk_products.restype = ctypes.c_int
            lib.lk_products.argtypes = []
            lib.lk_mm_f32.restype = None
            lib.lk_mm_f32.argtypes = [f32p, i64, i64, i64, f32p, i64, i64, f32p, i64]
            lib.lk_mtm_f32.restype = None
            lib.lk_mtm_f32.argtypes = [f32p, i64, i64, i64, f32p, i64, i64, f32p, i64, f32p]
        _state["lib"] = lib
    return _state["lib"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused loops apply: float32 CPU tensors and a library built for this machine."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def bracket(a: torch.Tensor, lo: float, hi: float, out: torch.Tensor) -> tuple[int, int]:
    """For a contiguous float32 ``a``: ``(count(|a| ≥ lo), k)`` with the ``k`` values of ``|a|`` in
    ``[lo, hi)`` written to ``out[:k]`` in order (``out`` holds at least ``a.numel()`` floats)."""
    lib = library()
    assert lib is not None and a.is_contiguous() and out.numel() >= a.numel()
    n_lo = ctypes.c_int64(0)
    k = lib.lk_bracket_f32(a.data_ptr(), a.numel(), lo, hi, out.data_ptr(), ctypes.byref(n_lo))
    return int(n_lo.value), int(k)


def kth_largest(v: torch.Tensor, k: int) -> float:
    """The ``k``-th largest of a contiguous 1-D float32 CPU tensor (``1 ≤ k ≤ len``), by radix selection on its
    bit patterns (``_delta.c``): two passes over ``v``, about a tenth of ``torch.kthvalue``'s time on 10^6."""
    lib = library()
    assert lib is not None and usable(v) and v.ndim == 1 and v.is_contiguous() and 1 <= k <= v.numel()
    work = torch.empty(v.numel(), dtype=torch.int32)
    return float(lib.lk_kth_largest_f32(v.data_ptr(), v.numel(), k, work.data_ptr()))


MODES = {"none": 0, "trim": 1, "band": 2, "mask": 3}


def merge(x: torch.Tensor, out: torch.Tensor, *, mode: str, signed: bool, lo: torch.Tensor | None = None,
          hi: torch.Tensor | None = None, mask: torch.Tensor | None = None
          ) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune and merge the task stack ``x (n, rows, cols)`` into ``out (rows, cols)`` in one pass.

    ``mode``: ``trim`` keeps ``|x_i| ≥ lo_i``; ``band`` keeps ``lo_i ≤ |x_i| < hi_i``; ``mask`` multiplies by
    ``mask (n, rows, cols)`` (0/1 floats); ``none`` keeps all. ``signed``: TIES election and disjoint mean,
    else the sum in task order (see ``_delta.c``). Each task's ``rows × cols`` must be contiguous.

    Returns ``(Σ sign, tie_index, tie_P, tie_q)``: the flat indices of sign ties in the tile (where ``out``
    holds the positive mean ``P/p``) with their positive mass and negative count."""
    lib = library()
    assert lib is not None
    n, rows, cols = x.shape
    length = rows * cols
    assert x[0].is_contiguous() and out.is_contiguous() and out.numel() == length
    if mask is not None:
        assert mask.shape == x.shape and mask[0].is_contiguous() and mask.dtype == torch.float32
    cap = length if signed else 0
    ties = torch.empty(cap, dtype=torch.int64)
    tie_p = torch.empty(cap, dtype=torch.float32)
    tie_q = torch.empty(cap, dtype=torch.float32)
    sigma = ctypes.c_double(0.0)
    lo32 = None if lo is None else lo.to(torch.float32).contiguous()
    hi32 = None if hi is None else hi.to(torch.float32).contiguous()
    k = lib.lk_merge_f32(x.data_ptr(), n, x.stride(0), length, MODES[mode], _ptr(lo32), _ptr(hi32), _ptr(mask),
                         0 if mask is None else mask.stride(0), int(signed), out.data_ptr(), ties.data_ptr(),
                         tie_p.data_ptr(), tie_q.data_ptr(), ctypes.byref(sigma))
    return float(sigma.value), ties[:k], tie_p[:k], tie_q[:k]


def della_(x: torch.Tensor, u: torch.Tensor, c1: float, c2: float) -> None:
    """DELLA's MAGPRUNE on a contiguous float32 tile ``x (rows, cols)``, in place, with its uniforms ``u`` (same
    shape): per row, ``p = rank(|x|)·c1 + c2`` (stable ranks) and ``x = x/p where u < p, else 0`` (``_delta.c``)."""
    lib = library()
    assert lib is not None and x.is_contiguous() and u.is_contiguous() and u.shape == x.shape and x.ndim == 2
    rows, cols = x.shape
    work = torch.empty(5 * cols, dtype=torch.int32)
    lib.lk_della_f32(x.data_ptr(), u.data_ptr(), rows, cols, c1, c2, work.data_ptr())


def products_usable(M: torch.Tensor) -> bool:
    """Whether :func:`mm` and :func:`mtm` apply to ``M``: float32 on the CPU, rows contiguous, and a library built
    with AVX-512 (elsewhere the callers use torch's products)."""
    lib = library()
    return (M.dtype == torch.float32 and M.device.type == "cpu" and M.ndim == 2 and M.stride(1) == 1
            and lib is not None and bool(lib.lk_products()))


def padded(x: torch.Tensor) -> torch.Tensor:
    """``x (n, k)`` as a contiguous float32 ``(n, 32·⌈k/32⌉)`` copy, zeros beyond ``k``."""
    out = torch.zeros(x.shape[0], -(-x.shape[1] // 32) * 32, dtype=torch.float32)
    out[:, :x.shape[1]] = x
    return out


PARALLEL_MIN = 1 << 20  # entries of M below which one product is not split over threads


def _spans(length: int, parts: int, align: int) -> list[tuple[int, int]]:
    step = -(-length // parts)
    step = -(-step // align) * align
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def mm(M: torch.Tensor, Z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``M @ Z`` (``(rows, cols) @ (cols, k)``) by the AVX-512 kernel of ``_delta.c`` (see
    :func:`products_usable`), written into ``out`` (``(rows, k)``, rows contiguous) when given. ``Z`` may come
    as :func:`padded` already (then ``k`` is ``out``'s width), which saves its copy per call on tiles.

    With several torch threads the rows are split over them (each row's sum is the same operations either
    way, so the bits do not depend on the thread count). Cost ``2·rows·cols·k`` flops, about 0.6 ns an entry of
    ``M`` for ``k ≤ 32`` on one Zen 4 core."""
    from lorakit.threads import parallel_map, workers

    lib = library()
    assert lib is not None and products_usable(M) and Z.shape[0] == M.shape[1]
    rows, cols = M.shape
    k = Z.shape[1] if out is None else out.shape[1]
    Y = torch.empty(rows, k, dtype=torch.float32) if out is None else out
    assert Y.shape == (rows, k) and Y.stride(1) == 1 and Y.dtype == torch.float32
    ready = Z.dtype == torch.float32 and Z.is_contiguous() and Z.shape[1] % 32 == 0 and Z.shape[1] >= k
    Zp = Z if ready else padded(Z)

    def part(span: tuple[int, int]) -> None:
        r0, r1 = span
        lib.lk_mm_f32(M[r0:].data_ptr(), r1 - r0, cols, M.stride(0), Zp.data_ptr(), Zp.stride(0), k,
                      Y[r0:].data_ptr(), Y.stride(0))

    if cols == 0:
        return Y.zero_()
    n = workers() if max(M.numel(), Y.numel()) >= PARALLEL_MIN else 1
    parallel_map(part, _spans(rows, n, 8) if rows else [])
    return Y


def mtm(M: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``Mᵀ @ Q`` (``(cols, k)``, from ``M (rows, cols)`` and ``Q (rows, k)``) by the AVX-512 kernel of
    ``_delta.c``; with several torch threads the columns are split over them (the same bits as one thread).
    Cost as :func:`mm`."""
    from lorakit.threads import parallel_map, workers

    lib = library()
    assert lib is not None and products_usable(M) and Q.shape[0] == M.shape[0]
    rows, cols = M.shape
    k = Q.shape[1]
    Bt = torch.empty(cols, k, dtype=torch.float32)
    Qp = padded(Q)

    def part(span: tuple[int, int]) -> None:
        c0, c1 = span
        work = torch.empty(64 * (c1 - c0), dtype=torch.float32)
        lib.lk_mtm_f32(M[:, c0:].data_ptr(), rows, c1 - c0, M.stride(0), Qp.data_ptr(), Qp.stride(0), k,
                       Bt[c0:].data_ptr(), Bt.stride(0), work.data_ptr())

    n = workers() if M.numel() >= PARALLEL_MIN else 1
    parallel_map(part, _spans(cols, n, 16) if cols else [])
    return Bt


def _stream_checked() -> bool:
    """Whether the C generator reproduces ``torch.rand`` here (checked once a process, on a draw that crosses
    several state regenerations): a torch that changed its stream would take the torch path, not a new one."""
    lib = library()
    if lib is None:
        return False
    if "ok" not in _stream:
        got = torch.empty(2000, dtype=torch.float32)
        lib.lk_uniform_f32(20240531, got.numel(), -1.0, got.data_ptr())
        _stream["ok"] = torch.equal(got, torch.rand(2000, generator=torch.Generator().manual_seed(20240531)))
    return _stream["ok"]


def stream_usable(out: torch.Tensor) -> bool:
    """Whether :func:`uniform_` can fill ``out``: a contiguous float32 CPU tensor and a C generator that
    reproduces ``torch.rand``."""
    return out.dtype == torch.float32 and out.device.type == "cpu" and out.is_contiguous() and _stream_checked()


def uniform_(out: torch.Tensor, seed: int, keep: float | None = None) -> torch.Tensor:
    """Fill ``out`` with ``torch.rand(out.shape, generator=torch.Generator().manual_seed(seed))``, the same
    values (``_delta.c``: MT19937 regenerated 624 words at a time, 0.3-0.4 ns a value against torch's 5), or with
    DARE's mask ``(that < keep)`` as 0/1 floats when ``keep`` is given. See :func:`stream_usable`."""
    lib = library()
    assert lib is not None and stream_usable(out) and 0 <= seed < 2 ** 32
    lib.lk_uniform_f32(seed, out.numel(), -1.0 if keep is None else float(keep), out.data_ptr())
    return out
