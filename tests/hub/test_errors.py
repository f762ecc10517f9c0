"""Every Hub failure becomes a one-line CLI error with a hint, exit 1, nothing written."""

from __future__ import annotations

import errno

import pytest

from lorakit.errors import HubError
from lorakit.hub import pull
from tests.hub.conftest import blobs, peft_repo_files


def _fails(cli, *args):
    code, out, err = cli(*args)
    assert code == 1, (out, err)
    lines = [line for line in err.splitlines() if line]
    assert lines[0].startswith("error: ") and len(lines) == 2 and lines[1].startswith("hint: ")
    return lines[0], lines[1]


def test_repo_not_found(fake_hub, hub_env, cli):
    msg, hint = _fails(cli, "pull", "org/missing")
    assert "repository org/missing not found" in msg and "HF_TOKEN" in hint


def test_revision_not_found(fake_hub, hub_env, cli):
    fake_hub.add_repo("org/a", peft_repo_files())
    msg, _hint = _fails(cli, "pull", "org/a@nope")
    assert "revision 'nope' not found in org/a" in msg


def test_gated_repo_without_token(fake_hub, hub_env, cli, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    fake_hub.add_repo("org/gated", peft_repo_files(), gated=True)
    msg, hint = _fails(cli, "pull", "org/gated")
    assert "org/gated is gated" in msg and "accept the conditions" in hint
    monkeypatch.setenv("HF_TOKEN", "hf_other_user")  # a valid account that has not accepted: 403
    msg, _ = _fails(cli, "pull", "org/gated")
    assert "is gated" in msg
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    assert pull("org/gated").adapter_path.is_file()
    assert not list(hub_env.glob("models--org--gated/snapshots/*/*.bin"))


def test_private_repo_without_token(fake_hub, hub_env, cli, monkeypatch):
    fake_hub.add_repo("org/secret", peft_repo_files(), private=True)
    monkeypatch.delenv("HF_TOKEN")
    msg, hint = _fails(cli, "pull", "org/secret")
    assert "not found" in msg and "private" in msg and "HF_TOKEN" in hint


def test_network_down_suggests_offline(hub_env, cli, monkeypatch):
    monkeypatch.setenv("LORAKIT_HUB_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    msg, hint = _fails(cli, "pull", "org/a")
    assert "cannot reach http://127.0.0.1:9" in msg and "--offline" in hint and "HF_HUB_OFFLINE" in hint


def test_file_not_in_repo(fake_hub, hub_env, cli):
    fake_hub.add_repo("org/a", peft_repo_files())
    msg, hint = _fails(cli, "pull", "hf://org/a/other.safetensors")
    assert "file 'other.safetensors' is not in org/a" in msg and "adapter_config.json" in hint


def test_file_missing_on_the_server_is_mapped(fake_hub, hub_env):
    """The client's own EntryNotFound (listing and server disagree) maps to the same message."""
    fake_hub.add_repo("org/a", peft_repo_files())
    import huggingface_hub

    from lorakit.hub._client import hub_errors, settings

    s = settings()
    with (pytest.raises(HubError, match="file 'gone.json' is not in org/a"),
          hub_errors(s, "org/a", "main", "gone.json")):
        huggingface_hub.hf_hub_download("org/a", "gone.json", cache_dir=s.cache_dir, endpoint=s.endpoint,
                                        token=s.token)


def test_disk_full(fake_hub, hub_env, cli, monkeypatch):
    import huggingface_hub.file_download as fd

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fd, "http_get", full)  # the write into the cache fails inside the real client
    fake_hub.add_repo("org/a", peft_repo_files())
    msg, hint = _fails(cli, "pull", "org/a")
    assert "disk full" in msg and "-o DIR" in hint
    assert blobs(hub_env) == []


@pytest.mark.parametrize("name", ["../x.safetensors", "/abs/x.safetensors", "sub/../../x.safetensors"])
def test_path_traversal_in_repo_listing_is_refused(fake_hub, hub_env, cli, tmp_path, name):
    fake_hub.add_repo("org/evil", {"adapter_model.safetensors": peft_repo_files()["adapter_model.safetensors"],
                                   name: b"pwned"})
    out = tmp_path / "dl" / "inner"
    out.parent.mkdir()
    msg, hint = _fails(cli, "pull", "org/evil", "-o", out)
    assert "unsafe file name" in msg and "malicious" in hint
    assert not [m for m, p, _ in fake_hub.requests if "/resolve/" in p]  # refused before any download
    assert not (tmp_path / "dl" / "x.safetensors").exists() and not (tmp_path / "x.safetensors").exists()


def test_push_without_token(hub_env, fake_hub, cli, monkeypatch, tmp_path):
    import lorakit
    from lorakit.testing import random_adapter
    from tests.hub.conftest import SHAPES

    f = tmp_path / "a.safetensors"
    lorakit.save(random_adapter(SHAPES, rank=2), f, format="kohya")
    monkeypatch.delenv("HF_TOKEN")
    msg, hint = _fails(cli, "push", f, "me/a")
    assert "publishing to me/a needs a Hub token" in msg and "HF_TOKEN" in hint
    assert "me/a" not in fake_hub.repos and fake_hub.requests == []
    monkeypatch.setenv("HF_TOKEN", "hf_not_this_users")  # a token the Hub rejects
    msg, hint = _fails(cli, "push", f, "me/a")
    assert "me/a" in msg and "HF_TOKEN" in hint and "me/a" not in fake_hub.repos
