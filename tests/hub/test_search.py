"""``search``: Hub-side tag filters, name query, limit, and the format column."""

from __future__ import annotations

import json

from lorakit.hub import search
from lorakit.hub.search import guess_format
from tests.hub.conftest import kohya_repo_files, peft_repo_files


def _arrange(hub):
    hub.add_repo("org/llama-a", peft_repo_files(), tags=["peft", "lora", "base_model:adapter:meta/llama"],
                 downloads=50, likes=3)
    hub.add_repo("org/llama-b", peft_repo_files(), tags=["peft", "lora", "base_model:adapter:meta/llama"],
                 downloads=500, likes=1, last_modified="2026-05-04T10:00:00.000Z")
    hub.add_repo("org/mistral", peft_repo_files(), tags=["peft", "lora", "base_model:adapter:mis/tral"],
                 downloads=9000)
    hub.add_repo("art/anime", kohya_repo_files(), tags=["lora", "kohya"], downloads=7)
    hub.add_repo("org/not-an-adapter", {"model.safetensors": b"x"}, tags=["transformers"], downloads=10**6)


def test_search_by_base_model(fake_hub, hub_env, cli):
    _arrange(fake_hub)
    hits = search(base_model="meta/llama")
    assert [h.repo_id for h in hits] == ["org/llama-b", "org/llama-a"]  # most downloaded first
    assert hits[0].downloads == 500 and hits[0].likes == 1 and hits[0].updated == "2026-05-04"
    assert {h.format for h in hits} == {"peft"}
    (req,) = [p for m, p, _ in fake_hub.requests if p.startswith("/api/models?")]
    assert "filter=base_model%3Aadapter%3Ameta%2Fllama" in req
    code, out, err = cli("search", "--base-model", "meta/llama", "--json")
    assert code == 0, err
    rows = json.loads(out)["modules"]
    assert [r["repo"] for r in rows] == ["org/llama-b", "org/llama-a"]
    assert set(rows[0]) == {"repo", "downloads", "likes", "updated", "format"}


def test_search_query_tags_and_limit(fake_hub, hub_env, cli):
    _arrange(fake_hub)
    assert [h.repo_id for h in search()] == ["org/mistral", "org/llama-b", "org/llama-a", "art/anime"]
    assert [h.repo_id for h in search(query="anime")] == ["art/anime"]
    assert [(h.repo_id, h.format) for h in search(tags=["kohya"])] == [("art/anime", "kohya")]
    assert len(search(limit=2)) == 2
    code, out, err = cli("search", "--query", "llama", "--limit", "1")
    assert code == 0, err
    assert "org/llama-b" in out and "org/llama-a" not in out and "peft" in out


def test_guess_format():
    assert guess_format(["adapter_config.json", "adapter_model.safetensors"], []) == "peft"
    assert guess_format(["pytorch_lora_weights.safetensors"], ["lora"]) == "diffusers"
    assert guess_format(["x.safetensors"], ["lycoris"]) == "lycoris"
    assert guess_format(["x.safetensors"], []) == "single-file"
    assert guess_format(["adapter_model.bin"], []) == "pickle"
    assert guess_format([], ["peft"]) == "peft"
    assert guess_format([], []) == "-"


def test_fake_model_info_carries_lfs_sha256(fake_hub, hub_env):
    """The fake answers model_info like the Hub, so clients older than 1.22 (siblings) see the same hashes."""
    import hashlib

    from lorakit.hub._client import api, settings

    files = peft_repo_files(seed=1)
    fake_hub.add_repo("org/a", files)
    info = api(settings()).model_info("org/a", files_metadata=True)
    sib = {s.rfilename: s for s in info.siblings}
    weights, config = sib["adapter_model.safetensors"], sib["adapter_config.json"]
    assert weights.lfs.sha256 == hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()
    assert config.lfs is None and config.size == len(files["adapter_config.json"])
