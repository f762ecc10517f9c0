"""Connection settings are read from the environment at call time, explicit arguments first."""

from __future__ import annotations

from pathlib import Path

from lorakit.hub import pull
from lorakit.hub._client import settings
from tests.hub.conftest import peft_repo_files


def test_settings_precedence(monkeypatch, tmp_path):
    for var in ("LORAKIT_HUB_ENDPOINT", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    s = settings()
    assert s.endpoint == "https://huggingface.co" and s.token is None and not s.offline
    assert s.cache_dir == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = settings()
    assert (s.endpoint, s.token, s.offline) == ("http://mirror.example", "hf_x", True)
    assert s.cache_dir == tmp_path / "home" / "hub"
    monkeypatch.setenv("LORAKIT_HUB_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert settings().endpoint == "http://127.0.0.1:1" and settings().cache_dir == Path(tmp_path / "c")
    assert settings(endpoint="http://x", offline=False, cache_dir=tmp_path).endpoint == "http://x"
    assert not settings(offline=False).offline


def test_hf_endpoint_is_honoured_after_import(fake_hub, hub_env, monkeypatch):
    """huggingface_hub read HF_ENDPOINT at import; lorakit passes the current value explicitly."""
    monkeypatch.delenv("LORAKIT_HUB_ENDPOINT")
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url + "/")
    fake_hub.add_repo("org/a", peft_repo_files())
    assert pull("org/a").adapter_path.is_file()
    assert fake_hub.count("GET", "/api/models/org/a") >= 1
