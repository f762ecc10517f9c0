"""Building lazy adapters from grouped tensor keys: the part every LoRA-style reader shares.

A reader groups its keys by module into roles (``A``, ``B``, ``alpha``, ``magnitude``, ``mid``, ``bias``),
decides each module's scale and name, and hands the groups here. Shapes, ranks and kinds come from the header;
tensors are read when a module is indexed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

from lorakit.adapter import Adapter, AdapterMeta, ModuleInfo
from lorakit.errors import FormatError, LorakitError, ShapeMismatchError
from lorakit.factors import LayerKind, LoraFactors
from lorakit.formats.base import Source

Roles = Mapping[str, str]  # role -> tensor key
T = TypeVar("T")


def check_pair(source: Source, name: str, roles: Roles) -> None:
    """Refuse, from the header alone, factor pairs that cannot form ΔW: wrong dimensionality, ranks that
    differ, zero-size factors (rank 0 or an empty layer dimension)."""
    a, b = source.store.shape(roles["A"]), source.store.shape(roles["B"])
    if len(a) not in (2, 4) or len(b) not in (2, 4):
        raise ShapeMismatchError(f"factors must be 2-D or 4-D, got A {a} and B {b}", file=source.path, module=name)
    if a[0] != b[1]:
        raise ShapeMismatchError(
            f"A and B ranks differ: A {a} has rank {a[0]}, B {b} has rank {b[1]}", file=source.path, module=name,
            hint="the file is damaged or was written by a buggy tool; re-export the adapter",
        )
    if len(b) == 4 and b[2:] != (1, 1):
        raise ShapeMismatchError(f"conv factor B {b} must have a 1x1 kernel", file=source.path, module=name)
    if "mid" in roles:
        mid = source.store.shape(roles["mid"])
        if len(mid) != 4 or mid[0] != b[1] or mid[1] != a[0]:
            raise ShapeMismatchError(
                f"Tucker core lora_mid {mid} does not fit A {a} and B {b} (expected ({b[1]}, {a[0]}, kh, kw))",
                file=source.path, module=name,
            )
    if 0 in a or 0 in b:
        what = "rank 0" if a[0] == 0 else "a zero-size layer dimension"
        raise ShapeMismatchError(
            f"zero-size factors ({what}: A {a}, B {b}) cannot hold a LoRA", file=source.path, module=name,
            hint="the export was empty or damaged; re-export the adapter from the trained model",
        )


def module_info(source: Source, name: str, roles: Roles, scale: float, kind: LayerKind | None = None) -> ModuleInfo:
    """Header-only facts of one module; raises :class:`ShapeMismatchError` for factors that cannot pair."""
    store = source.store
    if "A" not in roles or "B" not in roles:
        missing = "A (down)" if "A" not in roles else "B (up)"
        raise FormatError(f"factor {missing} is missing", file=source.path, module=name)
    check_pair(source, name, roles)
    a, b = store.shape(roles["A"]), store.shape(roles["B"])
    kernel: tuple[int, int] | None = None
    in_features = math.prod(a[1:])
    if "mid" in roles:
        mid = store.shape(roles["mid"])
        kernel = (mid[2], mid[3])
        in_features = a[1] * mid[2] * mid[3]
    elif len(a) == 4:
        kernel = (a[2], a[3])
    if kind is None:
        kind = "conv" if kernel is not None else "linear"
    if "bias" in roles and store.shape(roles["bias"]) != (b[0],):
        raise ShapeMismatchError(f"bias {roles['bias']} has shape {store.shape(roles['bias'])}, the layer has "
                                 f"{b[0]} outputs", file=source.path, module=name)
    return ModuleInfo(
        name, b[0], in_features, a[0], scale, store.dtype(roles["A"]), kind, kernel, "magnitude" in roles,
        "bias" in roles,
    )


def is_per_output(magnitude: torch.Tensor, out_features: int) -> bool:
    """A DoRA magnitude with one value per output row, leading: ``(out,)``, ``(out, 1)``, ``(out, 1, 1, 1)``.
    A per-input magnitude (LyCORIS ``wd_on_out=False``: ``(1, in[, 1, 1])``) is not."""
    return magnitude.ndim >= 1 and magnitude.numel() == out_features and magnitude.shape[0] == out_features


def peft_magnitude(f: LoraFactors, file: str | Path | None = None, module: str | None = None) -> torch.Tensor:
    """The magnitude in PEFT's stored layout: ``(out,)``, or ``(1, out, 1, 1)`` for conv layers.

    Raises:
        FormatError: a magnitude that is not per output row (LyCORIS ``wd_on_out=False``), which PEFT cannot
            represent.
    """
    assert f.magnitude is not None
    if not is_per_output(f.magnitude, f.out_features):
        raise FormatError(
            f"DoRA magnitude of shape {tuple(f.magnitude.shape)} is not one value per output row "
            f"({f.out_features}); PEFT has no per-input DoRA", file=file, module=module,
            hint="keep this adapter in the kohya/LyCORIS format",
        )
    return f.magnitude.reshape(peft_magnitude_shape(f.kind, f.out_features))


def peft_magnitude_shape(kind: LayerKind, out_features: int) -> tuple[int, ...]:
    """PEFT's stored shape of a per-output-row DoRA magnitude: ``(out,)``, or ``(1, out, 1, 1)`` for conv."""
    return (1, out_features, 1, 1) if kind == "conv" else (out_features,)


def kohya_magnitude_shape(kind: LayerKind, out_features: int) -> tuple[int, ...]:
    """The LyCORIS/ComfyUI stored shape of a per-output-row DoRA magnitude: ``(out, 1)``, or ``(out, 1, 1, 1)``."""
    return (out_features, 1, 1, 1) if kind == "conv" else (out_features, 1)


def load_factors(source: Source, info: ModuleInfo, roles: Roles, *, flat_magnitude: bool = False) -> LoraFactors:
    """Read one module's tensors and return its factors (conv flattened, Tucker ``mid`` folded into A).

    ``flat_magnitude``: the format's DoRA magnitudes are per output row (PEFT, diffusers); store them as
    ``(out,)``, the layout :class:`LoraFactors` documents.
    """
    store = source.store
    A, B = store.get(roles["A"]), store.get(roles["B"])
    r = A.shape[0]
    if "mid" in roles:
        # ΔW[o,i,h,w] = Σ_{m,n} B[o,m] mid[m,n,h,w] A[n,i]: fold mid into A, exactly, at rank r.
        # Computed in float32 or wider, stored in the file's dtype (half-precision files round the folded A).
        mid = store.get(roles["mid"])
        ct = torch.promote_types(A.dtype, torch.float32)
        A = torch.einsum("mnhw,ni->mihw", mid.to(ct), A.reshape(r, -1).to(ct)).to(A.dtype)
    A = A.reshape(r, -1)
    B = B.reshape(B.shape[0], -1)
    magnitude = store.get(roles["magnitude"]) if "magnitude" in roles else None
    if magnitude is not None and flat_magnitude:
        if magnitude.numel() != B.shape[0]:
            raise ShapeMismatchError(
                f"DoRA magnitude has {magnitude.numel()} values, the layer has {B.shape[0]} outputs",
                file=source.path, module=info.name,
            )
        magnitude = magnitude.reshape(-1)
    elif magnitude is not None and is_per_output(magnitude, B.shape[0]):
        magnitude = magnitude.reshape(-1)  # kohya/LyCORIS (out, 1[, 1, 1]): the same per-row layout
    extras: dict[str, torch.Tensor] = {}
    if "bias" in roles:
        # The file stores the up layer's bias b (PEFT: Δb = s·b); lorakit keeps the update Δb itself.
        b = store.get(roles["bias"])
        extras["bias"] = (b.to(torch.promote_types(torch.float32, b.dtype)) * info.scale).to(b.dtype)
    f = LoraFactors(A, B, info.scale, info.kernel, info.kind, magnitude, extras)
    f.check_finite(file=str(source.path), module=info.name)
    return f


@contextlib.contextmanager
def naming_key(name: str, key: str | None) -> Iterator[None]:
    """Inside the block, a :class:`LorakitError` about module ``name`` names ``key`` instead: the tensor key as
    written in the file, for formats (kohya, LyCORIS) whose module names are lorakit's mapping of their stems."""
    try:
        yield
    except LorakitError as e:
        if key is not None and key != name and e.module == name:
            e.module = key
            e.args = (e.one_line(),)
        raise


def labelled(load: Callable[[], T], name: str, key: str | None) -> Callable[[], T]:
    """``load`` with its errors naming ``key`` (see :func:`naming_key`); for lazy loaders."""
    if key is None or key == name:
        return load

    def run() -> T:
        with naming_key(name, key):
            return load()

    return run


def build_adapter(
    source: Source,
    groups: Mapping[str, Roles],
    *,
    scale_of: Callable[[str, Roles, int], float],
    name_of: Callable[[str], str] = lambda k: k,
    kind_of: Callable[[str, Roles], LayerKind | None] = lambda _k, _r: None,
    meta: AdapterMeta,
    flat_magnitude: bool = False,
    key_of: Callable[[str, Roles], str] | None = None,
) -> Adapter:
    """A lazy adapter over ``groups`` (stem → roles).

    Args:
        scale_of: ``(stem, roles, rank) → effective scale``.
        name_of: stem → module name in the adapter.
        kind_of: stem → layer kind, or ``None`` to infer it from the shapes.
        flat_magnitude: DoRA magnitudes are per output row in this format: read them as ``(out,)``.
        key_of: ``(stem, roles) → key`` that errors about the module name (the key as written in the file),
            when ``name_of`` maps stems to other names.
    """
    infos: dict[str, ModuleInfo] = {}
    loaders: dict[str, Callable[[], LoraFactors]] = {}
    for stem, roles in groups.items():
        name = name_of(stem)
        key = key_of(stem, roles) if key_of is not None else None
        with naming_key(name, key):
            if name in infos:
                raise FormatError(f"two tensor groups map to the same module (second: {stem!r})",
                                  file=source.path, module=name)
            if "A" not in roles or "B" not in roles:
                raise FormatError(f"factor {'A (down)' if 'A' not in roles else 'B (up)'} is missing",
                                  file=source.path, module=name)
            check_pair(source, name, roles)  # before scale_of, which divides by the rank
            rank = source.store.shape(roles["A"])[0]
            info = module_info(source, name, roles, scale_of(stem, roles, rank), kind_of(stem, roles))
        infos[name] = info
        loaders[name] = labelled(partial(load_factors, source, info, roles, flat_magnitude=flat_magnitude), name, key)
    return Adapter(loaders, meta, infos)


def read_alpha(source: Source, key: str) -> float | None:
    """A scalar alpha tensor's value; ``None`` when it is 0 (kohya's 'alpha = rank' convention)."""
    t = source.store.get(key)
    if t.numel() != 1:
        raise FormatError(f"alpha {key!r} is not a scalar (shape {tuple(t.shape)})", file=source.path)
    v = float(t.float().item())
    if not math.isfinite(v):
        raise FormatError(f"alpha {key!r} is {v}", file=source.path)
    return v if v != 0 else None
