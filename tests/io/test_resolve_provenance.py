"""io knows no Hub (the resolver is passed in) and provenance reads Hub origins from data, not a global."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.errors import FormatError
from lorakit.io.resolve import resolve_input
from lorakit.provenance import cache_origin, file_sha256, make_provenance

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_local_paths_pass_through_and_hub_specs_go_to_the_given_resolver(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x")
    assert resolve_input(f) == f
    seen = []

    def hub(spec: str, allow_pickle: bool) -> Path:
        seen.append((spec, allow_pickle))
        return f

    assert resolve_input("hf://org/repo@v1/a.safetensors", allow_pickle=True, hub=hub) == f
    assert resolve_input("org/repo", hub=hub) == f
    assert seen == [("hf://org/repo@v1/a.safetensors", True), ("org/repo", False)]


def test_a_hub_spec_without_a_resolver_is_refused_naming_it():
    with pytest.raises(FormatError, match="hf://org/repo"):
        resolve_input("hf://org/repo")


def test_provenance_origins_from_the_cache_layout_or_passed_in(tmp_path):
    cached = tmp_path / "models--org--repo" / "snapshots" / COMMIT / "sub" / "w.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"abc")
    plain = tmp_path / "copy.safetensors"
    plain.write_bytes(b"abc")
    assert cache_origin(cached) == {"repo": "org/repo", "revision": COMMIT, "path_in_repo": "sub/w.safetensors"}
    assert cache_origin(plain) is None
    rec = make_provenance("op", {"k": 1}, [cached, plain])
    assert rec["operation"] == "op" and rec["parameters"] == {"k": 1}
    assert rec["inputs"][0] == {"path": "w.safetensors", "sha256": file_sha256(cached), "repo": "org/repo",
                                "revision": COMMIT, "path_in_repo": "sub/w.safetensors"}
    assert rec["inputs"][1] == {"path": "copy.safetensors", "sha256": file_sha256(plain)}
    origin = {"repo": "org/other", "revision": "main", "path_in_repo": "copy.safetensors"}
    passed = make_provenance("op", {}, [plain], origins={str(plain): origin})
    assert passed["inputs"][0] == {"path": "copy.safetensors", "sha256": file_sha256(plain), **origin}


def test_io_formats_and_provenance_import_without_the_hub_package():
    code = ("import sys\n"
            "import lorakit.io.resolve, lorakit.provenance, lorakit.formats\n"
            "print(sorted(m for m in sys.modules if m.startswith('lorakit.hub') or m == 'huggingface_hub'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_provenance_hashed_in_the_background_is_the_eager_record(tmp_path, monkeypatch):
    """``make_provenance(background=True)``: placeholders of the digests' length at once, the eager record from
    :meth:`final`, and as metadata a deferred text of the eager text's length that settles to it."""
    from lorakit.io.writer import DeferredText
    from lorakit.provenance import PendingProvenance, provenance_metadata

    cached = tmp_path / "models--org--repo" / "snapshots" / COMMIT / "w.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"abc" * 1000)
    plain = tmp_path / "copy.safetensors"
    plain.write_bytes(b"xyz")
    eager = make_provenance("op", {"k": 1}, [cached, plain, tmp_path / "absent"])
    pending = make_provenance("op", {"k": 1}, [cached, plain, tmp_path / "absent"], background=True)
    assert isinstance(pending, PendingProvenance) and pending.final() == eager
    assert [r["sha256"] for r in pending["inputs"]] == ["0" * 64] * 2
    text = provenance_metadata(pending)["lorakit.provenance"]
    assert isinstance(text, DeferredText)
    assert text.final() == provenance_metadata(eager)["lorakit.provenance"] and len(text) == len(text.final())
    import lorakit.provenance as prov

    def unreadable(path, chunk=0):
        raise OSError(f"cannot read {path}")

    monkeypatch.setattr(prov, "file_sha256", unreadable)
    late = make_provenance("op", {}, [plain], background=True)
    with pytest.raises(OSError, match="cannot read"):  # the writer then leaves nothing (its close raises)
        late.final()
