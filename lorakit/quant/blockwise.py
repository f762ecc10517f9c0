"""Block-wise absmax quantization of 2-D tensors, row by row, and bit packing of the codes into uint8.

A tensor ``X (rows, cols)`` is cut into blocks of ``block`` consecutive elements *within each row* (the block
size must divide the row length, or ``pad=True`` pads each row with zeros, which quantize exactly to 0). Per
block ``a_b = max |x|``; each element is stored as the index of the code value nearest to ``x / â_b``, where
``â_b`` is ``a_b`` itself, or its double-quantized reconstruction (:mod:`lorakit.quant.double`). Rows are
quantized independently so that rows may carry different precisions (one singular direction per row).

Per-element error: ``|x − x̂| ≤ â_b·g/2 + |a_b − â_b|`` with ``g`` the code's largest gap (the second term only
with double quantization). Storage: ``bits + 32/block`` bits per element, or with double quantization
``bits + 8/block + 32/(block·256)`` (+ 32 bits of offset per tensor).

Packing: indices are written as a big-endian bit stream, ``bits`` bits each, first element in the most
significant bits (for 4 bits: first element in the high nibble, as bitsandbytes), padded with zero bits to a
whole byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.errors import CorruptFileError, OperatorParameterError
from lorakit.quant.codebooks import check_bits, codebook, nearest
from lorakit.quant.double import CONSTANT_BITS, CONSTANT_BLOCK, dequantize_constants, quantize_constants


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: ``bits`` ∈ {2, 3, 4, 8}, ``code`` (``nf`` or ``int``), ``block`` elements per absmax,
    ``double`` quantization of the constants (8-bit, groups of 256)."""

    bits: int = 4
    code: str = "nf"
    block: int = 64
    double: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits)
        codebook(self.code, self.bits)
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise OperatorParameterError(f"block size must be a positive integer, got {self.block!r}")

    @property
    def bits_per_parameter(self) -> float:
        """``b + 8/B₀ + 32/(B₀·256)`` with double quantization, ``b + 32/B₀`` without (large-tensor limit)."""
        if self.double:
            return self.bits + CONSTANT_BITS / self.block + 32 / (self.block * CONSTANT_BLOCK)
        return self.bits + 32 / self.block

    def to_json(self) -> dict[str, object]:
        return {"bits": self.bits, "code": self.code, "block": self.block, "double": self.double}


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized ``(rows, cols)`` tensor.

    Args:
        shape: the original ``(rows, cols)``.
        config: how it was quantized.
        codes: packed indices, uint8, ``ceil(rows·padded_cols·bits/8)`` bytes.
        absmax: fp32 per block (without double quantization), else ``None``.
        qabsmax, scale2, offset: the double-quantized constants (uint8 per block, fp32 per 256 blocks, fp32).
    """

    shape: tuple[int, int]
    config: QuantConfig
    codes: torch.Tensor
    absmax: torch.Tensor | None = None
    qabsmax: torch.Tensor | None = None
    scale2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def padded_cols(self) -> int:
        return -(-self.shape[1] // self.config.block) * self.config.block

    @property
    def n_blocks(self) -> int:
        return self.shape[0] * self.padded_cols // self.config.block

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role (``codes``, ``absmax`` or ``qabsmax``/``scale2``/``offset``)."""
        out = {"codes": self.codes}
        for role in ("absmax", "qabsmax", "scale2", "offset"):
            t = getattr(self, role)
            if t is not None:
                out[role] = t
        return out

    @property
    def storage_bits(self) -> int:
        """Exact stored size in bits (codes, constants, offset)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())

    def constants(self) -> torch.Tensor:
        """The (reconstructed) absmax per block, fp32 ``(n_blocks,)``."""
        if self.absmax is not None:
            return self.absmax.float()
        assert self.qabsmax is not None and self.scale2 is not None and self.offset is not None
        return dequantize_constants(self.qabsmax, self.scale2, self.offset)

    def validate(self, where: str = "tensor") -> None:
        """Check stored sizes against the shape and config; :class:`CorruptFileError` names what is wrong."""
        expected = {"codes": ((self.n_blocks * self.config.block * self.config.bits + 7) // 8, torch.uint8)}
        if self.config.double:
            expected.update(
                qabsmax=(self.n_blocks, torch.uint8),
                scale2=(-(-self.n_blocks // CONSTANT_BLOCK), torch.float32),
                offset=(1, torch.float32),
            )
        else:
            expected["absmax"] = (self.n_blocks, torch.float32)
        have = self.tensors()
        for role, (numel, dtype) in expected.items():
            t = have.get(role)
            if t is None:
                raise CorruptFileError(f"{where}: {role} tensor is missing")
            if t.numel() != numel or t.dtype != dtype:
                raise CorruptFileError(
                    f"{where}: {role} holds {t.numel()} {t.dtype} values, expected {numel} {dtype} for shape "
                    f"{self.shape} at {self.config.bits} bits, block {self.config.block}"
                )


def _group(bits: int) -> tuple[int, int]:
    """``(values, bytes)`` per packing group: the fewest values that fill whole bytes (3 bits: 8 values, 3 bytes)."""
    values = 8 // math.gcd(bits, 8)
    return values, values * bits // 8


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices ``< 2**bits`` into a uint8 bit stream (first element in the most significant bits),
    ``ceil(n·bits/8)`` bytes. Works a group of values at a time (one ≤ 24-bit word per group)."""
    idx = indices.reshape(-1).to(torch.int32)
    if bits == 8:
        return idx.to(torch.uint8)
    n = idx.numel()
    values, nbytes = _group(bits)
    idx = torch.nn.functional.pad(idx, (0, -n % values)).reshape(-1, values)
    word = torch.zeros(idx.shape[0], dtype=torch.int32, device=idx.device)
    for k in range(values):
        word |= idx[:, k] << (bits * (values - 1 - k))
    out = torch.stack([(word >> (8 * (nbytes - 1 - j))) & 0xFF for j in range(nbytes)], dim=1)
    return out.reshape(-1)[: (n * bits + 7) // 8].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` indices, int64."""
    if bits == 8:
        return packed.reshape(-1)[:n].to(torch.int64)
    values, nbytes = _group(bits)
    raw = packed.reshape(-1).to(torch.int32)
    raw = torch.nn.functional.pad(raw, (0, -raw.numel() % nbytes)).reshape(-1, nbytes)
    word = torch.zeros(raw.shape[0], dtype=torch.int32, device=raw.device)
    for j in range(nbytes):
        word |= raw[:, j] << (8 * (nbytes - 1 - j))
    mask = (1 << bits) - 1
    out = torch.stack([(word >> (bits * (values - 1 - k))) & mask for k in range(values)], dim=1)
    return out.reshape(-1)[:n].to(torch.int64)


def quantize_tensor(x: torch.Tensor, config: QuantConfig, *, pad: bool = False) -> QuantizedTensor:
    """Quantize a 2-D tensor row by row in blocks of ``config.block`` (see the module docstring).

    Raises:
        OperatorParameterError: the block size does not divide the row length and ``pad`` is off.
    """
    if x.ndim != 2:
        raise OperatorParameterError(f"can only quantize 2-D tensors, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    block = config.block
    if cols % block and not pad:
        raise OperatorParameterError(
            f"block size {block} does not divide the row length {cols}",
            hint=f"choose a block size that divides {cols} (--block), or pass --pad to pad each row with zeros",
        )
    xf = x.detach().to(torch.float32)  # stays on its device (CPU or CUDA)
    if cols % block:
        xf = torch.nn.functional.pad(xf, (0, -cols % block))
    blocks = xf.reshape(-1, block)
    absmax = blocks.abs().amax(dim=1)
    qabsmax = scale2 = offset = None
    if config.double:
        qabsmax, scale2, offset = quantize_constants(absmax)
        used = dequantize_constants(qabsmax, scale2, offset)
        offset = offset.reshape(1)
    else:
        used = absmax
    safe = torch.where(used > 0, used, torch.ones_like(used))
    idx = nearest((blocks / safe[:, None]).clamp(-1, 1), codebook(config.code, config.bits).to(xf.device))
    return QuantizedTensor(
        (rows, cols),
        config,
        pack(idx, config.bits),
        None if config.double else absmax,
        qabsmax,
        scale2,
        offset,
    )


def dequantize_tensor(q: QuantizedTensor, *, where: str = "tensor") -> torch.Tensor:
    """``x̂ = code[index] · â_block``, fp32 ``(rows, cols)``.

    Raises:
        CorruptFileError: sizes that do not fit the shape, or indices outside the code (a damaged file).
    """
    q.validate(where)
    code = codebook(q.config.code, q.config.bits).to(q.codes.device)
    idx = unpack(q.codes, q.config.bits, q.n_blocks * q.config.block)
    if idx.numel() and int(idx.max()) >= code.numel():
        raise CorruptFileError(f"{where}: code index {int(idx.max())} outside the {code.numel()}-value code")
    values = code[idx].reshape(q.n_blocks, q.config.block) * q.constants()[:, None]
    return values.reshape(q.shape[0], q.padded_cols)[:, : q.shape[1]].contiguous()


def error_bound(q: QuantizedTensor, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound ``â·g/2 + |a − â|`` (``(rows, cols)``) for the quantization of ``x`` into ``q``."""
    from lorakit.quant.codebooks import max_gap

    xf = torch.nn.functional.pad(x.float(), (0, q.padded_cols - q.shape[1]))
    a = xf.reshape(-1, q.config.block).abs().amax(dim=1)
    a_hat = q.constants().to(a.device)
    bound = a_hat * max_gap(codebook(q.config.code, q.config.bits)) / 2 + (a - a_hat).abs()
    full = bound[:, None].expand(-1, q.config.block).reshape(q.shape[0], q.padded_cols)
    return full[:, : q.shape[1]]


def storage_bits_formula(numel: int, config: QuantConfig) -> float:
    """``numel·(b + b₀/B₀ + 32/(B₀·B₁)) + 32`` (double) or ``numel·(b + 32/B₀)``: the storage of
    :class:`QuantizedTensor` for a row length that the block divides and a block count that 256 divides."""
    if config.double:
        return numel * config.bits_per_parameter + 32
    return numel * config.bits_per_parameter
