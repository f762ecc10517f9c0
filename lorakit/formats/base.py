"""What every format module provides, and the source (file, directory, pickle) it reads from."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lorakit.adapter import Adapter
from lorakit.errors import CorruptFileError, FormatError, NotAFileError, UnsafeFileError
from lorakit.io.files import loads_json, open_regular, path_problem, read_bytes
from lorakit.io.safetensors_file import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_NAMES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
PICKLE_NAMES = ("adapter_model.bin", "pytorch_lora_weights.bin")
MAX_CONFIG_BYTES = 16 * 2**20
CONFIG_HINT = "repair the file, or save the adapter again (PEFT's save_pretrained writes adapter_config.json)"


class TensorStore(Protocol):
    """Keys, shapes and metadata without reading data; tensors on request."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...


class SafetensorsStore:
    """A :class:`TensorStore` over a validated safetensors file."""

    def __init__(self, path: Path) -> None:
        self.file = SafetensorsFile(path)
        self.path = path
        self.metadata = self.file.metadata

    def keys(self) -> list[str]:
        return self.file.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        from lorakit.io.safetensors_file import DTYPES

        dt = DTYPES[self.file.info(name).dtype][0]
        return dt if dt is not None else torch.float32

    def get(self, name: str) -> torch.Tensor:
        return self.file.get(name)


class DictStore:
    """A :class:`TensorStore` over tensors already in memory (pickles read behind ``allow_pickle``)."""

    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.path = path
        self.tensors = dict(tensors)
        self.metadata = metadata or {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _load_pickle(path: Path, allow_pickle: bool) -> DictStore:
    if not allow_pickle:
        raise UnsafeFileError(f"refusing to unpickle {path.suffix} file (pickles can run code)", file=path)
    os.close(open_regular(path, what="pickle file"))  # torch.load would block on a FIFO
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptFileError(f"cannot load pickle with weights_only=True: {e}", file=path) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptFileError("pickle does not hold a flat dict of tensors", file=path)
    return DictStore(path, obj)


@dataclass
class Source:
    """An input as found on disk: the tensors, and a JSON config if one lies beside them.

    Args:
        path: what the user named (file or directory).
        store: the tensors.
        config: ``adapter_config.json`` (PEFT), if present.
        config_path: where the config came from.
    """

    path: Path
    store: TensorStore
    config: dict[str, Any] | None = None
    config_path: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return self.store.keys()

    @property
    def metadata(self) -> dict[str, str]:
        return self.store.metadata

    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False) -> Source:
        """Find the tensors (and config) that ``path`` names: a safetensors file, a PEFT-style directory, or a
        pickle (refused unless ``allow_pickle``)."""
        p = Path(path)
        problem = path_problem(p)
        if problem is not None and not p.is_dir():
            raise NotAFileError(problem, file=p)
        if not p.exists():
            raise FormatError("no such file or directory", file=p,
                              hint="check the path; a Hub repo is written org/name or hf://org/name[@rev]")
        config_path: Path | None = None
        if p.is_dir():
            # lexists, not is_file: a FIFO or loop under the adapter's name is refused when read, never skipped
            weights = next((p / n for n in WEIGHT_NAMES if os.path.lexists(p / n)), None)
            if weights is None:
                found = sorted(x.name for x in p.glob("*.safetensors"))
                if len(found) == 1:
                    weights = p / found[0]
            if weights is None:
                pickled = next((p / n for n in PICKLE_NAMES if (p / n).is_file()), None)
                if pickled is None:
                    if len(found) > 1:
                        raise FormatError(
                            f"directory holds {len(found)} *.safetensors files and no adapter_model.safetensors",
                            file=p, hint=f"name the adapter file itself, e.g. {p / found[0]}",
                        )
                    raise FormatError(
                        "directory holds no adapter weights (adapter_model.safetensors or a *.safetensors file)",
                        file=p, hint="point at the adapter's directory or at its .safetensors file",
                    )
                weights = pickled
            if os.path.lexists(p / "adapter_config.json"):
                config_path = p / "adapter_config.json"  # not a regular file: refused when read, never skipped
        else:
            weights = p
            if os.path.lexists(p.parent / "adapter_config.json") and p.name in (*WEIGHT_NAMES, *PICKLE_NAMES):
                config_path = p.parent / "adapter_config.json"
        store: TensorStore
        if weights.suffix in PICKLE_SUFFIXES:
            store = _load_pickle(weights, allow_pickle)
        else:
            store = SafetensorsStore(weights)
        config = None
        if config_path is not None:
            try:
                config = loads_json(read_bytes(config_path, limit=MAX_CONFIG_BYTES, what="JSON config"))
            except NotAFileError:
                raise
            except (OSError, ValueError) as e:
                raise FormatError(f"not valid JSON ({e})", file=config_path, hint=CONFIG_HINT) from e
            if not isinstance(config, dict):
                raise FormatError("not a JSON object", file=config_path, hint=CONFIG_HINT)
        return cls(p, store, config, config_path)


class ReadableFormat(Protocol):
    """A file format lorakit reads: content sniffing and reading (LyCORIS is read only)."""

    name: str
    description: str
    writable: bool

    def sniff(self, source: Source) -> bool:
        """True if the content (keys, config), not the file name, says this format."""
        ...

    def read(self, source: Source) -> Adapter:
        """A lazy :class:`Adapter`; raises :class:`FormatError` subclasses naming the file and key."""
        ...



@runtime_checkable
class Format(ReadableFormat, Protocol):
    """A format lorakit also writes."""

    def write(self, adapter: Adapter, path: Path, metadata: Mapping[str, str]) -> Path:
        """Write ``adapter`` to ``path`` (atomically); returns the path written."""
        ...


def group_by_module(keys: list[str], suffixes: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Group tensor keys by module: ``{module: {role: key}}`` for keys ending in one of ``suffixes``
    (``suffix → role``); longer suffixes win. Keys matching no suffix are left out."""
    ordered = sorted(suffixes.items(), key=lambda kv: -len(kv[0]))
    out: dict[str, dict[str, str]] = {}
    for k in keys:
        for suffix, role in ordered:
            if k.endswith(suffix):
                out.setdefault(k[: -len(suffix)], {})[role] = k
                break
    return out
