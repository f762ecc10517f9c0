"""Full model checkpoints in safetensors: one file, or shards with ``model.safetensors.index.json``.

:class:`Checkpoint` reads headers only when opened (names, shapes, dtypes, which shard holds what) and one tensor
at a time on request, so a command can validate a whole plan before reading any weight.
:class:`CheckpointWriter` writes the same layout back (same shard file names, an index with the new
``total_size``), shard by shard through :class:`~lorakit.io.writer.SafetensorsWriter`, atomically: the output
file or directory appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Self

import torch

from lorakit.errors import CorruptFileError, FormatError, NotAFileError
from lorakit.io.atomic import atomic_output
from lorakit.io.files import loads_json, path_problem, read_bytes
from lorakit.io.safetensors_file import DTYPES, SafetensorsFile, TensorInfo
from lorakit.io.writer import Layout, SafetensorsWriter

INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
MAX_INDEX_BYTES = 256 * 2**20
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class Checkpoint:
    """A safetensors checkpoint: a ``.safetensors`` file, an index ``.json``, or a directory holding either.

    Raises:
        FormatError: no safetensors weights found, or an index that names a missing shard or a missing tensor.
        CorruptFileError: a damaged shard (from the header checks of :class:`SafetensorsFile`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.index_path: Path | None = None
        self.directory: Path | None = None
        self.index_metadata: dict[str, object] = {}
        shard_files = self._locate()
        self.shards: dict[str, SafetensorsFile] = {p.name: SafetensorsFile(p) for p in shard_files}
        self._where: dict[str, str] = {}
        for shard, f in self.shards.items():
            for k in f.keys():
                if k in self._where:
                    raise CorruptFileError(f"tensor {k!r} is in two shards ({self._where[k]} and {shard})",
                                           file=self.path)
                self._where[k] = shard
        if self.index_path is not None:
            self._check_index()

    def _locate(self) -> list[Path]:
        p = self.path
        if p.is_dir():
            self.directory = p
            for name in INDEX_NAMES:
                if (p / name).is_file():
                    return self._read_index(p / name)
            for name in SINGLE_NAMES:
                if (p / name).is_file():
                    return [p / name]
            files = sorted(p.glob("*.safetensors"))
            if len(files) == 1:
                return files
            raise FormatError("no model.safetensors or model.safetensors.index.json in the directory"
                              + (f" ({len(files)} .safetensors files and no index)" if files else ""), file=p)
        if p.suffix == ".json":
            self.directory = p.parent
            return self._read_index(p)
        problem = path_problem(p)
        if problem is not None:
            raise NotAFileError(problem, file=p)
        if not p.exists():
            raise FormatError("no such file or directory", file=p)
        return [p]

    def _read_index(self, index: Path) -> list[Path]:
        self.index_path = index
        try:
            data = loads_json(read_bytes(index, limit=MAX_INDEX_BYTES, what="safetensors index"))
            weight_map = data["weight_map"]
            assert isinstance(weight_map, dict)
        except NotAFileError:
            raise
        except ValueError as e:
            raise FormatError(f"not a safetensors index: not valid JSON ({e})", file=index) from e
        except (KeyError, TypeError, AssertionError) as e:
            raise FormatError("not a safetensors index (needs a weight_map object)", file=index) from e
        self.index_metadata = dict(data.get("metadata") or {})
        self._index_map: dict[str, str] = {str(k): str(v) for k, v in weight_map.items()}
        names = list(dict.fromkeys(self._index_map.values()))
        for n in names:
            if Path(n).name != n:
                raise FormatError(f"index names a shard outside its directory: {n!r}", file=index)
            if not os.path.lexists(index.parent / n):  # a FIFO or loop is refused when opened, not "missing"
                raise FormatError(f"index names shard {n!r}, which is missing", file=index)
        return [index.parent / n for n in names]

    def _check_index(self) -> None:
        for k, shard in self._index_map.items():
            if self._where.get(k) != shard:
                raise FormatError(f"index says tensor {k!r} is in {shard}, but it is not there", file=self.index_path)

    # ---- reading ------------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return self.index_path is not None

    def keys(self) -> list[str]:
        """Tensor names, shard by shard, in each shard's file order."""
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self.shards[self._where[name]].info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype | None:
        return DTYPES[self.info(name).dtype][0]

    def shard_of(self, name: str) -> str:
        return self._where[name]

    def layout(self) -> dict[str, list[str]]:
        """Shard file name → tensor names in it."""
        return {s: f.keys() for s, f in self.shards.items()}

    def tensor_layout(self) -> Layout:
        """Name → (dtype, shape) of every tensor of a dtype torch has, as stored (for a writer's layout)."""
        return {n: (dt, self.shape(n)) for n in self.keys() if (dt := self.dtype(n)) is not None}

    def metadata(self, shard: str | None = None) -> dict[str, str]:
        """The ``__metadata__`` of a shard (default: the first)."""
        return dict(self.shards[shard or next(iter(self.shards))].metadata)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard into a fresh buffer.

        Plain reads, not a memory map: the pages of a mapped file that were touched stay in the process's
        resident set until it is unmapped, so streaming a whole checkpoint through a map would make the
        resident set grow to the checkpoint's size. With reads, memory is the tensor itself.
        """
        f = self.shards[self._where[name]]
        info = f.info(name)
        dtype = DTYPES[info.dtype][0]
        if dtype is None:
            raise CorruptFileError(f"tensor {name!r} has dtype {info.dtype}, which torch cannot hold", file=f.path)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            with open(f.path, "rb") as fh:
                fh.seek(f.data_start + info.begin)
                got = fh.readinto(memoryview(buf.numpy()))  # type: ignore[arg-type]  # numpy arrays are buffers
            if got != info.nbytes:
                raise CorruptFileError(f"truncated while reading tensor {name!r}", file=f.path)
        return buf.view(dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape, dtype=dtype)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._where:
            yield k, self.get(k)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.shards.values())

    def close(self) -> None:
        for f in self.shards.values():
            f.close()


class CheckpointWriter:
    """Write a checkpoint with a given layout (shard name → tensor names), tensor by tensor, atomically.

    ``path`` is a ``.safetensors`` file (single-shard layouts only) or a directory, which gets the shards, an
    index when there is more than one shard, and copies of ``companions`` (e.g. the base's ``config.json``).
    Tensors must be added shard by shard in layout order; at most one shard is open at a time. ``tensors``, the
    expected dtype and shape of each tensor (e.g. the base's, for a checkpoint written as it was read), lets each
    shard be written in place (:class:`~lorakit.io.writer.SafetensorsWriter`'s ``layout``).
    """

    def __init__(self, path: str | Path, layout: Mapping[str, list[str]], *, metadata: Mapping[str, str] | None = None,
                 index_name: str = INDEX_NAMES[0], index_metadata: Mapping[str, object] | None = None,
                 companions: list[Path] = (),  # type: ignore[assignment]
                 tensors: Layout | None = None) -> None:
        self.path = Path(path)
        self.layout = {k: list(v) for k, v in layout.items()}
        self.tensors = dict(tensors or {})
        self.metadata = dict(metadata or {})
        self.index_name = index_name
        self.index_metadata = dict(index_metadata or {})
        self.companions = list(companions)
        self.single_file = self.path.suffix == ".safetensors"
        if self.single_file and len(self.layout) > 1:
            raise FormatError("a sharded checkpoint needs a directory as output", file=self.path,
                              hint="give -o a directory name")
        self._stack = ExitStack()
        self._root: Path | None = None
        self._shards = iter(self.layout.items())
        self._current: tuple[str, set[str], SafetensorsWriter] | None = None
        self._total = 0
        self._written: set[str] = set()

    def __enter__(self) -> Self:
        if not self.single_file:
            self._root = self._stack.enter_context(atomic_output(self.path, directory=True))
        return self

    def _target(self, shard: str) -> Path:
        return self.path if self.single_file else (self._root / shard)  # type: ignore[operator]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must belong to the current shard or open the next one."""
        while self._current is None or name not in self._current[1]:
            if self._current is not None:
                self._finish_shard()
            try:
                shard, names = next(self._shards)
            except StopIteration:
                raise FormatError(f"tensor {name!r} is not in the layout (or came out of order)",
                                  file=self.path) from None
            planned = {n: self.tensors[n] for n in names if n in self.tensors}
            w = SafetensorsWriter(self._target(shard), self.metadata, layout=planned or None)
            self._current = (shard, set(names), w)
        shard, _, w = self._current
        w.add(name, tensor)
        self._written.add(name)
        self._total += tensor.numel() * tensor.element_size()

    def _finish_shard(self) -> None:
        assert self._current is not None
        shard, names, w = self._current
        self._current = None
        missing = names - self._written
        if missing:
            w.abort()
            raise FormatError(f"shard {shard} is missing {len(missing)} tensor(s), e.g. {min(missing)!r}",
                              file=self.path)
        w.close()

    def _finalize(self) -> None:
        if self._current is not None:
            self._finish_shard()
        for shard, names in self._shards:  # a shard never opened: every tensor of it is missing
            raise FormatError(f"shard {shard} was never written ({len(names)} tensor(s))", file=self.path)
        if self._root is not None:
            if len(self.layout) > 1:
                index = {"metadata": {**self.index_metadata, "total_size": self._total},
                         "weight_map": {n: s for s, ns in self.layout.items() for n in ns}}
                (self._root / self.index_name).write_text(json.dumps(index, indent=2) + "\n")
            for c in self.companions:
                shutil.copy2(c, self._root / c.name)

    def _abort_current(self) -> None:
        if self._current is not None:
            self._current[2].abort()
            self._current = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            try:
                self._finalize()
            except BaseException as e:
                self._abort_current()
                self._stack.__exit__(type(e), e, e.__traceback__)
                raise
            self._stack.__exit__(None, None, None)
        else:
            self._abort_current()
            self._stack.__exit__(exc_type, exc, tb)


def companion_files(checkpoint: Checkpoint) -> list[Path]:
    """Small non-weight files beside a checkpoint in a directory (``config.json``, tokenizer files...)."""
    if checkpoint.directory is None or not checkpoint.path.is_dir():
        return []
    skip = set(checkpoint.shards) | {checkpoint.index_path.name if checkpoint.index_path else ""}
    return [p for p in sorted(checkpoint.directory.iterdir())
            if p.is_file() and p.name not in skip and not p.name.startswith(".") and p.suffix != ".safetensors"]


WRAPPER_PREFIXES = ("base_model.model.", "unet.", "transformer.", "text_encoder.", "text_encoder_2.")


def weight_key(module: str, keys: set[str]) -> str | None:
    """The checkpoint tensor a module's ΔW applies to, or ``None``.

    In order: ``<module>.weight``; the same after dropping a wrapper prefix (``base_model.model.``, a
    diffusers component such as ``unet.``); the one key ending in ``.<module>.weight`` if exactly one does.
    """
    names = [module] + [module[len(p):] for p in WRAPPER_PREFIXES if module.startswith(p)]
    for n in names:
        if f"{n}.weight" in keys:
            return f"{n}.weight"
    for n in names:
        hits = [k for k in keys if k.endswith(f".{n}.weight")]
        if len(hits) == 1:
            return hits[0]
    return None
