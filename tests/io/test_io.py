"""safetensors reading and writing: strict output, lenient but validating input, atomic publication."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorakit.errors import CorruptFileError, OutputError
from lorakit.io import (
    SafetensorsFile,
    SafetensorsWriter,
    atomic_output,
    check_output_path,
    read_header,
    write_safetensors,
)

TENSORS = {
    "b.f16": torch.arange(6, dtype=torch.float16).reshape(2, 3),
    "a.bf16": torch.linspace(-1, 1, 5).to(torch.bfloat16),
    "c.f64": torch.tensor([1.5, -2.25], dtype=torch.float64),
    "d.alpha": torch.tensor(8.0),  # 0-d scalar, as kohya stores alpha
    "e.i8": torch.tensor([-3, 7], dtype=torch.int8),
    "f.empty": torch.zeros(0, 4),
}


def raw_file(path: Path, header: str, data: bytes = b"", length: int | None = None) -> Path:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_writer_output_is_strict_and_reads_back_exactly(tmp_path):
    path = write_safetensors(tmp_path / "t.safetensors", TENSORS, {"format": "pt", "k": "v"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    keys = list(header)
    assert keys[0] == "__metadata__" and header["__metadata__"] == {"format": "pt", "k": "v"}
    # Decreasing alignment (bits per element), then name.
    assert keys[1:] == ["c.f64", "d.alpha", "f.empty", "a.bf16", "b.f16", "e.i8"]
    with safe_open(str(path), framework="pt") as f:  # the reference reader agrees
        for k, t in TENSORS.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got, t)
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt", "k": "v"}
    assert {k: f.get(k).dtype for k in TENSORS} == {k: t.dtype for k, t in TENSORS.items()}


def test_reader_accepts_whitespace_before_the_header_object(tmp_path):
    entry = '{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = raw_file(tmp_path / "ws.safetensors", "  " + entry + "  ", struct.pack("<f", 2.5))
    tensors, metadata, start = read_header(path)
    assert tensors["x"].shape == (1,) and metadata == {} and start == 8 + len(entry) + 4


@pytest.mark.parametrize(("header", "data", "length", "cause"), [
    ('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8, None, "trailing bytes"),
    ('{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 4, None, "truncated"),
    ('{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4, None, "header lies"),
    ('{"x":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, None, "unknown dtype"),
    ('{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\0" * 4, None, "negative"),
    ('{"x":{"dtype":"F32","shape":[1]}}', b"", None, "corrupt header entry"),
    ('{"__metadata__":{"n":1}}', b"", None, "strings"),
    ('[1, 2]', b"", None, "not a JSON object"),
    (('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
     '"y":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'), b"\0" * 4, None, "offsets"),
    ("{}", b"", 200_000_000, "100 MB"),
    ("{}", b"", 64, "truncated"),
])
def test_reader_rejects_damaged_headers(tmp_path, header, data, length, cause):
    path = raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CorruptFileError, match=cause) as e:
        SafetensorsFile(path)
    assert e.value.file == str(path)


def test_writer_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), SafetensorsWriter(path) as w:
        w.add("x", torch.ones(3))
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    with pytest.raises(OutputError, match="written twice"), SafetensorsWriter(tmp_path / "two.safetensors") as w:
        w.add("x", torch.ones(1))
        w.add("x", torch.ones(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_atomic_directory_output_replaces_the_old_directory(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    with atomic_output(final, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (final / "new.txt").exists()  # nothing visible until success
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with pytest.raises(ValueError), atomic_output(final, directory=True) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise ValueError("fail")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_output_path_checks(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"x")
    for bad in (src, src / "adapter_model.safetensors", src / "sub.safetensors", tmp_path):
        with pytest.raises(OutputError, match="would overwrite"):
            check_output_path(bad, [src])
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "x.safetensors")
    assert check_output_path(tmp_path / "ok.safetensors", [src]) == tmp_path / "ok.safetensors"


@pytest.mark.parametrize("kernel_copy", ["available", "refused", "missing"])
def test_writer_reorders_with_or_without_copy_file_range(tmp_path, monkeypatch, kernel_copy):
    """The final file is byte-identical whether the kernel copies the data ranges or Python does."""
    import os

    if kernel_copy == "refused":
        def refuse(*_a, **_k):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    elif kernel_copy == "missing":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    tensors = {"z": torch.arange(7, dtype=torch.float16), "a": torch.randn(33, 5, dtype=torch.float64),
               "m": torch.randn(4, 3).to(torch.bfloat16)}
    path = write_safetensors(tmp_path / f"{kernel_copy}.safetensors", tensors, {"k": "v"})
    with safe_open(str(path), "pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)


@pytest.mark.parametrize("case", ["exact", "wrong shape", "missing", "extra", "metadata grew", "none"])
def test_writer_layout_changes_the_speed_never_the_file(tmp_path, monkeypatch, case):
    """With the layout given up front each tensor is written at its final place (no copy); a layout that turns
    out wrong in any way makes the writer copy instead, and the bytes are the same as without a layout."""
    from lorakit.io import writer

    reference = write_safetensors(tmp_path / "reference.safetensors", TENSORS, {"k": "v"}).read_bytes()
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in TENSORS.items()}
    if case == "wrong shape":
        layout["b.f16"] = (torch.float16, (3, 2))
    elif case == "missing":
        del layout["a.bf16"]
    elif case == "extra":
        layout["g.unused"] = (torch.float32, (2,))
    copies = []
    copy_range = writer._copy_range
    monkeypatch.setattr(writer, "_copy_range", lambda *a: copies.append(a) or copy_range(*a))
    path = tmp_path / "out.safetensors"
    with SafetensorsWriter(path, {"k": "v"} if case != "metadata grew" else {},
                           layout=None if case == "none" else layout) as w:
        for name in reversed(list(TENSORS)):  # any order
            w.add(name, TENSORS[name])
        if case == "metadata grew":
            w.metadata["k"] = "v"
    assert path.read_bytes() == reference
    assert bool(copies) == (case != "exact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "reference.safetensors"]


def test_writer_in_place_failure_leaves_nothing(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), SafetensorsWriter(path, layout={"x": (torch.float32, (3,))}) as w:
        w.add("x", torch.ones(3))
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_writer_settles_deferred_metadata_in_place(tmp_path, monkeypatch):
    """A metadata value known only at close (a :class:`DeferredText`, as the provenance's input digests are while
    they are hashed) keeps the file in place and gives the bytes of writing its final text from the start; one
    that changes length is refused and leaves nothing."""
    from lorakit.io import writer
    from lorakit.io.writer import DeferredText

    final = "f" * 64
    reference = write_safetensors(tmp_path / "reference.safetensors", TENSORS, {"k": final}).read_bytes()
    layout = {n: (t.dtype, tuple(t.shape)) for n, t in TENSORS.items()}
    copies: list[object] = []
    monkeypatch.setattr(writer, "_copy_range", lambda *a: copies.append(a))
    path = tmp_path / "out.safetensors"
    with SafetensorsWriter(path, {"k": DeferredText("0" * 64, lambda: final)}, layout=layout) as w:
        for name, t in TENSORS.items():
            w.add(name, t)
    assert path.read_bytes() == reference and not copies
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match="length"), \
            SafetensorsWriter(bad, {"k": DeferredText("0" * 64, lambda: "short")}, layout=layout) as w:
        for name, t in TENSORS.items():
            w.add(name, t)
    assert not bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "reference.safetensors"]
