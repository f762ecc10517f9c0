"""LyCORIS LoHa and LoKr (and PEFT's ``LOHA`` / ``LOKR``), read as exact LoRA factors; LoCon modules too.

Keys (kohya stems, or ``base_model.model.<module>`` for PEFT), no ``.weight`` suffix:

- LoHa: ``hada_w1_a (out, r)``, ``hada_w1_b (r, in·kh·kw)``, ``hada_w2_a``, ``hada_w2_b``;
  ``ΔW = s·(w1_a @ w1_b) ⊙ (w2_a @ w2_b)``. Tucker (``hada_t1/t2 (r, r, kh, kw)``): ``w*_a`` is ``(r, out)``,
  ``w*_b`` is ``(r, in)`` and ``W1[o,i,h,w] = Σ_ab t1[a,b,h,w]·w1_a[a,o]·w1_b[b,i]``.
  Scale ``alpha / r`` with ``r = hada_w1_b.shape[0]`` (1.0 without alpha).
- LoKr: ``lokr_w1 (a, c)`` or ``lokr_w1_a (a, r) @ lokr_w1_b (r, c)``; ``lokr_w2 (b, d[, kh, kw])`` or
  ``lokr_w2_a (b, r) @ lokr_w2_b (r, d·kh·kw)`` or Tucker ``einsum(t2, w2_a (r, b), w2_b (r, d))``;
  ``ΔW = s·kron(w1, w2)`` (flattened to ``(a·b, c·d·kh·kw)``). Scale: 1 if both factors are full (alpha is
  ignored, as LyCORIS and ComfyUI do), else ``alpha / r`` with r the low-rank factor's rank (w1's first).
  PEFT's LoKr uses ``alpha / r`` from its config always.

Conversion to LoRA, exact and without the dense ΔW:

- LoHa: the face-splitting product ``B[o,(a,b)] = w1_a[o,a]·w2_a[o,b]`` ``(out, r1·r2)`` and the Khatri–Rao
  product ``A[(a,b),i] = w1_b[a,i]·w2_b[b,i]`` ``(r1·r2, in)`` give ``B @ A = W1 ⊙ W2`` exactly.
- LoKr: with SVDs ``w1 = U1 S1 V1ᵀ`` and ``w2 = U2 S2 V2ᵀ`` (small), ``kron(w1, w2)`` has singular values
  ``σ_i(w1)·σ_j(w2)`` and singular vectors ``u_i ⊗ u'_j``, ``v_i ⊗ v'_j``: an exact SVD of rank
  ``rank(w1)·rank(w2)``.

Where the exact rank exceeds ``min(out, in)`` it is reduced without loss (LoHa, by
:func:`lorakit.linalg.factored_svd`); where it exceeds ``max_rank`` the best truncation is taken, and the
relative Frobenius error of every truncated module is reported (notes, ``format_config``, a
:class:`~lorakit.errors.LossyOperationWarning`). lorakit writes LoRA, not LoHa/LoKr.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter import Adapter, AdapterMeta, ModuleInfo
from lorakit.errors import FormatError, LorakitError, LossyOperationWarning, ShapeMismatchError
from lorakit.factors import LoraFactors
from lorakit.formats import kohya
from lorakit.formats._lora import Roles, build_adapter, labelled, naming_key, read_alpha
from lorakit.formats.base import Source, group_by_module
from lorakit.formats.keymaps import CONV1X1_ENDINGS, CONV3X3_ENDINGS, KeyMap, base_weight_shapes
from lorakit.linalg import SVD, compute_dtype, factored_svd

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
SUFFIXES = {
    **kohya.SUFFIXES,
    **{f".{r}": r for r in LOHA_ROLES + LOKR_ROLES},
    ".dora_scale": "magnitude",
}
PEFT_PREFIX = "base_model.model."
PEFT_TYPES = ("LOHA", "LOKR")
ERRORS_KEY = "lycoris_truncation_errors"


# ---- the exact conversions --------------------------------------------------------------------------------
def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tucker ``W[o,i,h,w] = Σ_ab t[a,b,h,w]·wa[a,o]·wb[b,i]`` as ``U (out, r) @ D (r, in·kh·kw)``."""
    D = torch.einsum("abhw,bi->aihw", t, wb).reshape(t.shape[0], -1)
    return wa.T, D


def loha_factors(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                 t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA ``(B (out, r1·r2), A (r1·r2, in·kh·kw))`` of the LoHa ``(w1a@w1b) ⊙ (w2a@w2b)`` (unscaled).

    Cost O((out + in)·r1·r2); no ``out × in`` matrix is formed.
    """
    dt = compute_dtype(w1a, w1b, w2a, w2b)
    w1a, w1b, w2a, w2b = (x.to(dt) for x in (w1a, w1b, w2a, w2b))
    if t1 is not None and t2 is not None:
        (w1a, w1b), (w2a, w2b) = _tucker(t1.to(dt), w1a, w1b), _tucker(t2.to(dt), w2a, w2b)
    w1b, w2b = w1b.reshape(w1b.shape[0], -1), w2b.reshape(w2b.shape[0], -1)
    B = torch.einsum("oa,ob->oab", w1a, w2a).reshape(w1a.shape[0], -1)  # face-splitting (row-wise Kronecker)
    A = torch.einsum("ai,bi->abi", w1b, w2b).reshape(-1, w1b.shape[1])  # Khatri–Rao (column-wise Kronecker)
    return B, A


def _small_svd(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None, rank: int) -> SVD:
    """SVD of a Kronecker factor given full or as ``a @ b``, truncated to its ``rank`` (the shape bound)."""
    if full is not None:
        U, S, Vh = torch.linalg.svd(full, full_matrices=False)
        return SVD(U, S, Vh).truncate(rank)
    assert a is not None and b is not None
    return factored_svd(a, b).truncate(rank)


def lokr_svd(w1: SVD, w2: SVD, max_rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact (or best rank-``max_rank``) LoRA of ``kron(W1, W2)`` from the SVDs of W1 and W2.

    Returns ``(B, A, relative Frobenius error)``; ``B = U·√S``, ``A = √S·Vh`` with the pairs ``(i, j)`` ordered
    by ``σ_i(W1)·σ_j(W2)``. Cost O((a·b + c·d)·k) for k kept pairs.
    """
    S = torch.outer(w1.S, w2.S).reshape(-1)
    order = torch.argsort(S, descending=True, stable=True)
    k = len(order) if max_rank is None else min(max_rank, len(order))
    keep = order[:k]
    i, j = keep // w2.S.shape[0], keep % w2.S.shape[0]
    root = S[keep].clamp_min(0).sqrt()
    B = torch.einsum("xt,yt->xyt", w1.U[:, i], w2.U[:, j]).reshape(-1, k) * root
    A = torch.einsum("tu,tv->tuv", w1.Vh[i], w2.Vh[j]).reshape(k, -1) * root.unsqueeze(1)
    total = float((S.double() ** 2).sum())
    dropped = float((S[order[k:]].double() ** 2).sum())  # summed directly: no cancellation when little is lost
    err = math.sqrt(dropped / total) if total > 0 else 0.0
    return B, A, err


# ---- per-module plans (header-only) -----------------------------------------------------------------------
class _Plan:
    """How one LoHa/LoKr module becomes LoRA: its header facts and the loader."""

    def __init__(self, info: ModuleInfo, exact_rank: int, load: Callable[[], tuple[LoraFactors, float]]):
        self.info, self.exact_rank, self.load = info, exact_rank, load


def _kernel_for(name: str, cols: int, known: tuple[int, int] | None,
                base_shape: tuple[int, ...] | None = None) -> tuple[int, int] | None:
    """The conv kernel: from 4-D tensors when stored; for flattened ones, from the base model's weight when one
    is given (``base=`` a checkpoint), else 3×3 / 1×1 when the name is a 3×3 conv / a ResBlock shortcut."""
    if known is not None:
        return known
    if base_shape is not None:
        if len(base_shape) == 4 and math.prod(base_shape[1:]) == cols:
            return (base_shape[2], base_shape[3])
        return None
    if cols % 9 == 0 and any(name.endswith(("." + e, "_" + e)) for e in CONV3X3_ENDINGS):
        return (3, 3)
    if any(name.endswith(("." + e, "_" + e)) for e in CONV1X1_ENDINGS):
        return (1, 1)
    return None


def _base_shape(shapes: Mapping[str, tuple[int, ...]] | None, name: str) -> tuple[int, ...] | None:
    if shapes is None:
        return None
    from lorakit.io.checkpoint import weight_key

    key = weight_key(name, set(shapes))
    return None if key is None else shapes[key]


def _plan_loha(source: Source, name: str, roles: Roles, alpha: float | None, max_rank: int | None,
               peft_scale: float | None, base_shape: tuple[int, ...] | None = None) -> _Plan:
    st, file = source.store, source.path
    missing = [r for r in LOHA_ROLES[:4] if r not in roles]
    if missing:
        raise FormatError(f"LoHa module lacks {', '.join(missing)}", file=file, module=name)
    sh = {r: st.shape(roles[r]) for r in LOHA_ROLES if r in roles}
    tucker = "hada_t1" in roles and "hada_t2" in roles
    if tucker != ("hada_t1" in roles or "hada_t2" in roles):
        raise FormatError("LoHa Tucker module needs both hada_t1 and hada_t2", file=file, module=name)
    kernel: tuple[int, int] | None = None
    if tucker:
        t1, t2 = sh["hada_t1"], sh["hada_t2"]
        kernel = (t1[2], t1[3])
        out, inn = sh["hada_w1_a"][1], sh["hada_w1_b"][1]
        ok = (len(t1) == 4 and t2[2:] == t1[2:] and sh["hada_w2_a"][1] == out and sh["hada_w2_b"][1] == inn
              and t1[0] == t1[1] == sh["hada_w1_a"][0] == sh["hada_w1_b"][0]
              and t2[0] == t2[1] == sh["hada_w2_a"][0] == sh["hada_w2_b"][0])
        cols = inn * kernel[0] * kernel[1]
    else:
        out = sh["hada_w1_a"][0]
        b1, b2 = sh["hada_w1_b"], sh["hada_w2_b"]
        cols = math.prod(b1[1:])
        if len(b1) == 4:
            kernel = (b1[2], b1[3])
        ok = (sh["hada_w1_a"][1] == b1[0] and sh["hada_w2_a"][1] == b2[0] and sh["hada_w2_a"][0] == out
              and math.prod(b2[1:]) == cols)
    if not ok:
        raise ShapeMismatchError(f"LoHa factors do not fit together: {sh}", file=file, module=name)
    r1, r2 = sh["hada_w1_b"][0], sh["hada_w2_b"][0]
    scale = peft_scale if peft_scale is not None else (1.0 if alpha is None else alpha / r1)
    kernel = _kernel_for(name, cols, kernel, base_shape)
    exact = min(r1 * r2, out, cols)
    k = exact if max_rank is None else min(exact, max_rank)

    def load() -> tuple[LoraFactors, float]:
        t = {r: st.get(roles[r]) for r in LOHA_ROLES if r in roles}
        B, A = loha_factors(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                            t.get("hada_t1") if tucker else None, t.get("hada_t2") if tucker else None)
        err = 0.0
        if k < r1 * r2:
            svd = factored_svd(B, A)
            err = svd.tail_error(k)
            f = svd.truncate(k).to_factors()
            B, A = f.B, f.A
        return _factors(source, name, roles, A, B, scale, kernel), err

    dtype = compute_dtype(*(torch.empty(0, dtype=st.dtype(roles[r])) for r in LOHA_ROLES[:4]))
    return _Plan(_info(name, out, cols, k, scale, dtype, kernel, roles), exact, load)


def _plan_lokr(source: Source, name: str, roles: Roles, alpha: float | None, max_rank: int | None,
               peft_scale: float | None, base_shape: tuple[int, ...] | None = None) -> _Plan:
    st, file = source.store, source.path
    sh = {r: st.shape(roles[r]) for r in LOKR_ROLES if r in roles}
    w1_full, w2_full = "lokr_w1" in roles, "lokr_w2" in roles
    w1_low = "lokr_w1_a" in roles and "lokr_w1_b" in roles
    w2_low = "lokr_w2_a" in roles and "lokr_w2_b" in roles
    if not (w1_full or w1_low) or not (w2_full or w2_low):
        raise FormatError("LoKr module needs lokr_w1 (or lokr_w1_a/b) and lokr_w2 (or lokr_w2_a/b)",
                          file=file, module=name)
    bad = ShapeMismatchError(f"LoKr factors do not fit together: {sh}", file=file, module=name)
    if w1_full:
        if len(sh["lokr_w1"]) != 2:
            raise bad
        a, c = sh["lokr_w1"]
        p = min(a, c)
    else:
        (a, r1), (r1b, c) = sh["lokr_w1_a"], sh["lokr_w1_b"]
        if r1 != r1b:
            raise bad
        p = min(a, c, r1)
    kernel: tuple[int, int] | None = None
    tucker = "lokr_t2" in roles
    if w2_full:
        w2 = sh["lokr_w2"]
        if len(w2) not in (2, 4):
            raise bad
        b, cols2 = w2[0], math.prod(w2[1:])
        kernel = (w2[2], w2[3]) if len(w2) == 4 else None
        q = min(b, cols2)
    elif tucker:
        t2, w2a, w2b = sh["lokr_t2"], sh["lokr_w2_a"], sh["lokr_w2_b"]
        if len(t2) != 4 or not (t2[0] == t2[1] == w2a[0] == w2b[0]):
            raise bad
        b, kernel = w2a[1], (t2[2], t2[3])
        cols2 = w2b[1] * t2[2] * t2[3]
        q = min(b, cols2, t2[0])
    else:
        (b, r2), w2b = sh["lokr_w2_a"], sh["lokr_w2_b"]
        if r2 != w2b[0]:
            raise bad
        cols2 = math.prod(w2b[1:])
        kernel = (w2b[2], w2b[3]) if len(w2b) == 4 else None
        q = min(b, cols2, r2)
    out, cols = a * b, c * cols2
    if peft_scale is not None:
        scale = peft_scale
    elif w1_full and w2_full:
        scale = 1.0  # LyCORIS/ComfyUI: both factors full → alpha is ignored
    else:
        r = sh["lokr_w1_b"][0] if w1_low else sh["lokr_w2_b"][0]
        scale = 1.0 if alpha is None else alpha / r
    kernel = _kernel_for(name, cols2 if base_shape is None else cols, kernel, base_shape)
    exact = p * q
    k = exact if max_rank is None else min(exact, max_rank)

    def load() -> tuple[LoraFactors, float]:
        t = {r: st.get(roles[r]) for r in LOKR_ROLES if r in roles}
        dt = compute_dtype(*t.values())
        t = {r: v.to(dt) for r, v in t.items()}
        s1 = _small_svd(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), p)
        if w2_full:
            s2 = _small_svd(t["lokr_w2"].reshape(b, -1), None, None, q)
        elif tucker:
            U, D = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            s2 = _small_svd(None, U, D, q)
        else:
            s2 = _small_svd(None, t["lokr_w2_a"], t["lokr_w2_b"].reshape(t["lokr_w2_b"].shape[0], -1), q)
        B, A, err = lokr_svd(s1, s2, k)
        return _factors(source, name, roles, A, B, scale, kernel), err

    dtype = compute_dtype(*(torch.empty(0, dtype=st.dtype(roles[r])) for r in roles if r in LOKR_ROLES))
    return _Plan(_info(name, out, cols, k, scale, dtype, kernel, roles), exact, load)


def _info(name: str, out: int, cols: int, rank: int, scale: float, dtype: torch.dtype,
          kernel: tuple[int, int] | None, roles: Roles) -> ModuleInfo:
    return ModuleInfo(name, out, cols, rank, scale, dtype, "conv" if kernel else "linear", kernel,
                      "magnitude" in roles)


def _factors(source: Source, name: str, roles: Roles, A: torch.Tensor, B: torch.Tensor, scale: float,
             kernel: tuple[int, int] | None) -> LoraFactors:
    magnitude = source.store.get(roles["magnitude"]) if "magnitude" in roles else None
    f = LoraFactors(A.contiguous(), B.contiguous(), scale, kernel, "conv" if kernel else "linear", magnitude)
    f.check_finite(file=str(source.path), module=name)
    return f


# ---- the format -------------------------------------------------------------------------------------------
def _is_lycoris_key(k: str) -> bool:
    return k.endswith((".hada_w1_a", ".lokr_w1", ".lokr_w1_a"))


class LycorisFormat:
    name = "lycoris"
    description = "LyCORIS LoHa / LoKr (also mixed with LoCon), and PEFT LOHA / LOKR; read as exact LoRA"
    writable = False

    def sniff(self, source: Source) -> bool:
        if source.config is not None:
            return str(source.config.get("peft_type", "")).upper() in PEFT_TYPES
        return any(_is_lycoris_key(k) for k in source.keys)

    def read(self, source: Source, keymap: Mapping[str, str] | KeyMap | None = None, arch: str | None = None,
             base: str | Path | None = None, max_rank: int | None = None) -> Adapter:
        """Read LoHa/LoKr/LoCon modules as LoRA factors; ``max_rank`` truncates (the loss is reported)."""
        if max_rank is not None and max_rank < 1:
            raise FormatError(f"max_rank must be at least 1, got {max_rank}", file=source.path)
        groups = group_by_module(source.keys, SUFFIXES)
        config = source.config if source.config is not None else None
        peft = config is not None
        notes: list[str] = []
        shapes = base_weight_shapes(base) if base is not None else None
        if shapes is not None:
            base = None  # a checkpoint gives kernels; module names come from the file
        if peft:
            assert config is not None
            names: kohya.Names = {s: s.removeprefix(PEFT_PREFIX) for s in groups}
        else:
            names, notes = kohya.resolve_names(source, list(groups), keymap=keymap, arch=arch, base=base)
        lora_groups = {s: r for s, r in groups.items() if "A" in r or "B" in r}
        missing_alpha: list[str] = []

        def alpha_of(stem: str, roles: Roles) -> float | None:
            alpha = read_alpha(source, roles["alpha"]) if "alpha" in roles else None
            if alpha is None:
                missing_alpha.append(stem)
            return alpha

        def lora_scale(stem: str, roles: Roles, rank: int) -> float:
            alpha = alpha_of(stem, roles)
            return 1.0 if alpha is None else alpha / rank

        used = {k for roles in groups.values() for k in roles.values()}
        passthrough = {k: (lambda k=k: source.store.get(k)) for k in source.keys if k not in used}
        meta = AdapterMeta(
            base_model=(config or {}).get("base_model_name_or_path") or source.metadata.get("ss_sd_model_name")
            or source.metadata.get("modelspec.architecture"),
            source_format=self.name,
            source_path=str(source.path),
            format_config=dict(config or {}) if peft else {k: v for k, v in source.metadata.items()
                                                     if k != kohya.NAMES_KEY},
            metadata=source.metadata,
            passthrough=passthrough,
        )
        lora = build_adapter(source, lora_groups, scale_of=lora_scale,
                             name_of=lambda s: kohya.name_or_stem(names, s), meta=meta, key_of=kohya.key_as_written)
        modules: dict[str, Any] = {}
        infos: dict[str, ModuleInfo] = {}
        errors: dict[str, float] = {}
        counts = {"LoCon": len(lora), "LoHa": 0, "LoKr": 0}
        for stem, roles in groups.items():
            name = kohya.name_or_stem(names, stem)
            if stem in lora_groups:
                modules[name] = lambda name=name: lora[name]
                infos[name] = lora.info(name)
                continue
            is_loha = "hada_w1_a" in roles
            if not is_loha and not any(r in roles for r in LOKR_ROLES):
                continue  # only alpha / dora_scale: nothing to apply
            if name in modules:
                raise FormatError("two tensor groups map to the same module", file=source.path, module=name)
            peft_scale = _peft_scale(config, name) if peft else None
            key = kohya.key_as_written(stem, roles)
            with naming_key(name, key):
                alpha = None if peft else alpha_of(stem, roles)
                try:
                    plan = (_plan_loha if is_loha else _plan_lokr)(source, name, roles, alpha, max_rank, peft_scale,
                                                                   _base_shape(shapes, name))
                except (ValueError, IndexError) as e:
                    if isinstance(e, LorakitError):
                        raise
                    got = {r: source.store.shape(k) for r, k in roles.items()}
                    raise ShapeMismatchError(
                        f"{'LoHa' if is_loha else 'LoKr'} factors have unexpected shapes: {got}",
                        file=source.path, module=name) from e
                plan.load = labelled(plan.load, name, key)
            counts["LoHa" if is_loha else "LoKr"] += 1
            infos[name] = plan.info
            if plan.info.rank < plan.exact_rank:
                f, err = plan.load()
                errors[name] = err
                modules[name] = f
            else:
                modules[name] = lambda plan=plan: plan.load()[0]
        if not modules:
            raise FormatError("no LoHa, LoKr or LoRA modules found", file=source.path)
        adapter = Adapter(modules, meta, infos)
        adapter = kohya.apply_splits(adapter, names, file=str(source.path))
        found = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        notes.append(f"LyCORIS modules ({found}) read as exact LoRA factors")
        if errors:
            worst = max(errors, key=lambda n: errors[n])
            msg = (f"{len(errors)} LoHa/LoKr module(s) truncated to rank {max_rank}: relative Frobenius error "
                   f"max {errors[worst]:.3g} ({worst}), mean {sum(errors.values()) / len(errors):.3g}")
            notes.append(msg)
            warnings.warn(msg, LossyOperationWarning, stacklevel=2)
            adapter = adapter.with_meta(format_config={**adapter.meta.format_config, ERRORS_KEY: errors})
        if missing_alpha:
            notes.append(f"{len(missing_alpha)} module(s) store no alpha: scale 1.0 applies (alpha = rank)")
        unknown = [k for k in passthrough if not k.endswith(".alpha")]
        if unknown:
            notes.append(f"{len(unknown)} tensor(s) of other LyCORIS algorithms are not part of the adapter "
                         f"(e.g. {unknown[0]!r})")
        return adapter.with_meta(notes=tuple(notes))


def _peft_scale(config: Mapping[str, Any] | None, name: str) -> float:
    """PEFT LOHA/LOKR: ``alpha / r`` from the config (``alpha``, ``r`` and their patterns), always."""
    from lorakit.formats.peft import pattern_value

    assert config is not None
    r = pattern_value(config.get("rank_pattern") or {}, name) or config.get("r", 8)
    alpha = pattern_value(config.get("alpha_pattern") or {}, name)
    if alpha is None:
        alpha = config.get("alpha", 8)
    return float(alpha) / float(r)
