"""Hub references and repo file names: parsing, and refusing names that could escape the download folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.errors import HubError
from lorakit.hub.spec import HubSpec, join_inside, parse_spec, safe_repo_path


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("org/name", HubSpec("org/name")),
        ("org/name@v2", HubSpec("org/name", "v2")),
        ("hf://org/name", HubSpec("org/name")),
        ("hf://org/name@dev/sub/a.safetensors", HubSpec("org/name", "dev", "sub/a.safetensors")),
        ("hf://org/name/a.safetensors", HubSpec("org/name", None, "a.safetensors")),
        ("org/name@refs/pr/1", HubSpec("org/name", "refs/pr/1")),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["hf://org", "hf://org/na--me", "hf://../x/y", "org/name.git", "hf:///x/y"])
def test_parse_spec_refuses_bad_repo_ids(spec):
    with pytest.raises(HubError):
        parse_spec(spec)


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "/etc/passwd", "C:/x.safetensors", "c:x", "a\\..\\x", "\\\\host\\share\\x",
             "a//b", "./a", "a/.", "", "a\0b"],
)
def test_unsafe_repo_file_names_are_refused(name, tmp_path):
    with pytest.raises(HubError, match="unsafe file name"):
        safe_repo_path(name)
    with pytest.raises(HubError):
        join_inside(tmp_path, name)


@pytest.mark.parametrize("name", ["a.safetensors", "sub/dir/adapter_config.json", "a..b.safetensors", ".hidden"])
def test_safe_names_stay_inside(name, tmp_path):
    assert safe_repo_path(name) == name
    target = join_inside(tmp_path, name)
    assert Path(tmp_path).resolve() in target.resolve().parents


def test_traversal_in_spec_path_is_refused():
    with pytest.raises(HubError, match="unsafe"):
        parse_spec("hf://org/name/../../x.safetensors")
