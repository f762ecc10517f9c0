"""``pull`` through the real huggingface_hub client against the loopback fake Hub."""

from __future__ import annotations

import hashlib

import pytest
import torch

import lorakit
from lorakit.errors import HubError
from lorakit.hub import pull
from lorakit.testing import assert_adapters_close, random_adapter
from tests.hub.conftest import SHAPES, blobs, go_offline, kohya_repo_files, peft_repo_files

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def resolve_gets(hub, repo: str) -> set[str]:
    """Files whose bytes were requested (GET on the resolve URL)."""
    return {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in hub.requests
            if m == "GET" and p.startswith(f"/{repo}/resolve/")}


def test_pull_peft_repo_fetches_only_adapter_files(fake_hub, hub_env, cli):
    files = peft_repo_files(seed=3)
    commit = fake_hub.add_repo("org/a", files, tags=["peft", "lora"])
    code, out, err = cli("pull", "org/a")
    assert code == 0, err
    assert resolve_gets(fake_hub, "org/a") == ADAPTER_FILES  # no training_args.bin, no checkpoint-10/
    snap = hub_env / "models--org--a" / "snapshots" / commit
    assert str(snap) in out.replace("\n", "")
    for name in ADAPTER_FILES:
        assert (snap / name).read_bytes() == files[name]
    assert not (snap / "training_args.bin").exists() and not (snap / "checkpoint-10").exists()
    loaded = lorakit.load("hf://org/a")
    assert loaded.meta.source_format == "peft" and loaded.meta.base_model == "org/base"
    assert_adapters_close(loaded, random_adapter(SHAPES, rank=4, seed=3))


def test_pull_kohya_repo_returns_the_file(fake_hub, hub_env):
    files = kohya_repo_files(seed=5)
    fake_hub.add_repo("org/k", files, tags=["lora"])
    result = pull("org/k")
    assert [f.path_in_repo for f in result.files] == ["style.safetensors"]
    assert result.files[0].verified == "sha256"
    assert result.files[0].sha256 == hashlib.sha256(files["style.safetensors"]).hexdigest()
    assert result.adapter_path.read_bytes() == files["style.safetensors"]
    assert resolve_gets(fake_hub, "org/k") == {"style.safetensors"}  # sample.png not fetched
    loaded = lorakit.load("org/k")
    assert loaded.meta.source_format == "kohya"
    assert_adapters_close(loaded, random_adapter(SHAPES, rank=4, seed=5))


def test_pinned_revision_and_branch(fake_hub, hub_env):
    v1 = fake_hub.add_repo("org/a", peft_repo_files(seed=1))
    v2_files = peft_repo_files(seed=2)
    v2 = fake_hub.commit("org/a", {"adapter_model.safetensors": v2_files["adapter_model.safetensors"]})
    fake_hub.commit("org/a", {"adapter_model.safetensors": peft_repo_files(seed=9)["adapter_model.safetensors"]},
                    branch="dev")
    old = pull(f"org/a@{v1}")
    assert old.commit == v1 and old.root.name == v1
    assert_adapters_close(lorakit.load(old.adapter_path), random_adapter(SHAPES, rank=4, seed=1))
    new = pull("org/a")
    assert new.commit == v2
    assert_adapters_close(lorakit.load(new.adapter_path), random_adapter(SHAPES, rank=4, seed=2))
    dev = lorakit.load("hf://org/a@dev")
    assert_adapters_close(dev, random_adapter(SHAPES, rank=4, seed=9))


def test_one_file_in_a_subfolder(fake_hub, hub_env):
    fake_hub.add_repo("org/a", peft_repo_files(seed=1))
    result = pull("hf://org/a/checkpoint-10/adapter_model.safetensors")
    assert {f.path_in_repo for f in result.files} == {"checkpoint-10/adapter_model.safetensors", "README.md"}
    assert resolve_gets(fake_hub, "org/a") == {"checkpoint-10/adapter_model.safetensors", "README.md"}


def test_pull_to_output_folder_makes_real_copies(fake_hub, hub_env, tmp_path, cli):
    files = peft_repo_files(seed=1)
    fake_hub.add_repo("org/a", files)
    out = tmp_path / "mine"
    code, _, err = cli("pull", "org/a", "-o", out, "--quiet")
    assert code == 0, err
    for name in ADAPTER_FILES:
        assert (out / name).is_file() and not (out / name).is_symlink()
        assert (out / name).read_bytes() == files[name]


def test_offline_reuses_the_cache_without_any_request(fake_hub, hub_env, monkeypatch, cli):
    fake_hub.add_repo("org/a", peft_repo_files(seed=4))
    online = pull("org/a")
    fake_hub.requests.clear()
    code, out, err = cli("pull", "org/a", "--offline", "--json")
    assert code == 0, err
    assert '"verified": "etag"' in out  # the LFS blob is named by its sha256 and re-hashed
    go_offline(monkeypatch)
    offline = pull("org/a")
    assert offline.offline and offline.commit == online.commit
    assert {f.local for f in offline.files} == {f.local for f in online.files}
    assert_adapters_close(lorakit.load("hf://org/a"), random_adapter(SHAPES, rank=4, seed=4))
    assert fake_hub.requests == []


def test_offline_without_cache_says_so(fake_hub, hub_env, monkeypatch, cli):
    fake_hub.add_repo("org/a", peft_repo_files())
    go_offline(monkeypatch)
    code, _out, err = cli("pull", "org/a")
    assert code == 1
    assert "not in the local cache" in err and "hint:" in err
    assert fake_hub.requests == []


def test_resume_after_the_connection_drops_mid_file(fake_hub, hub_env, monkeypatch):
    from huggingface_hub import constants

    # The client hands bytes to the file in DOWNLOAD_CHUNK_SIZE pieces (10 MB); with small chunks the bytes
    # received before the drop are kept, as they are for a real multi-megabyte adapter.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64)
    files = peft_repo_files(seed=6)
    fake_hub.add_repo("org/a", files)
    half = len(files["adapter_model.safetensors"]) // 2 // 64 * 64  # a whole number of chunks
    fake_hub.drop_once[("org/a", "adapter_model.safetensors")] = half
    result = pull("org/a")
    ranges = [h.get("range") or h.get("Range") for m, p, h in fake_hub.requests
              if m == "GET" and p.endswith("/adapter_model.safetensors")]
    assert ranges == [None, f"bytes={half}-"]  # the second request resumed where the first stopped
    weights = next(f for f in result.files if f.path_in_repo == "adapter_model.safetensors")
    assert weights.local.read_bytes() == files["adapter_model.safetensors"]
    assert weights.verified == "sha256"


def test_sha256_mismatch_is_detected_and_the_file_not_kept(fake_hub, hub_env, cli):
    files = peft_repo_files(seed=7)
    fake_hub.add_repo("org/a", files)
    good = files["adapter_model.safetensors"]
    bad = bytearray(good)
    bad[-1] ^= 0xFF  # same size, so the client's own size check passes
    fake_hub.corrupt[("org/a", "adapter_model.safetensors")] = bytes(bad)
    code, _out, err = cli("pull", "org/a")
    assert code == 1
    assert "does not match the Hub's sha256" in err and "deleted" in err
    assert all(p.read_bytes() != bytes(bad) for p in blobs(hub_env))
    assert not list(hub_env.glob("models--org--a/snapshots/*/adapter_model.safetensors"))
    del fake_hub.corrupt[("org/a", "adapter_model.safetensors")]
    assert pull("org/a").adapter_path.read_bytes() == good  # a later pull fetches it again


def test_git_blob_id_checks_small_files(fake_hub, hub_env):
    files = peft_repo_files(seed=7)
    fake_hub.add_repo("org/a", files)
    cfg = files["adapter_config.json"]
    fake_hub.corrupt[("org/a", "adapter_config.json")] = cfg.replace(b'"r"', b'"R"')
    with pytest.raises(HubError, match="git-sha1"):
        pull("org/a")


def test_pickles_are_refused_unless_asked(fake_hub, hub_env, cli):
    a = random_adapter(SHAPES, rank=2, seed=0)
    state = {f"base_model.model.{n}.lora_{x}.weight": getattr(f, x).contiguous() for n, f in a.items()
             for x in ("A", "B")}
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    fake_hub.add_repo("org/p", {"adapter_model.bin": buf.getvalue(), "training_args.bin": b"x"})
    code, _, err = cli("pull", "org/p")
    assert code == 1 and "only pickled weights" in err and "--allow-pickle" in err
    assert resolve_gets(fake_hub, "org/p") == set()
    code, _, err = cli("pull", "hf://org/p/adapter_model.bin")
    assert code == 1 and "is a pickle" in err
    assert resolve_gets(fake_hub, "org/p") == set()
    code, _, err = cli("pull", "org/p", "--allow-pickle", "--quiet")
    assert code == 0, err
    assert resolve_gets(fake_hub, "org/p") == {"adapter_model.bin"}


def test_dry_run_downloads_nothing(fake_hub, hub_env, cli):
    fake_hub.add_repo("org/a", peft_repo_files())
    code, out, err = cli("pull", "org/a", "--dry-run")
    assert code == 0, err
    assert "plan: pull" in out and "adapter_model.safetensors" in out
    assert resolve_gets(fake_hub, "org/a") == set() and not hub_env.exists()


def test_standard_weight_name_wins_over_extra_files(fake_hub, hub_env):
    files = peft_repo_files(seed=8)
    files["other.safetensors"] = kohya_repo_files()["style.safetensors"]
    fake_hub.add_repo("org/a", files)
    result = pull("org/a")
    assert result.adapter_path.name == "adapter_model.safetensors"
    assert_adapters_close(lorakit.load("org/a"), random_adapter(SHAPES, rank=4, seed=8))
    fake_hub.add_repo("org/two", {"a.safetensors": files["other.safetensors"], "b.safetensors": files["other.safetensors"]})
    with pytest.raises(HubError, match="several adapter files"):
        lorakit.load("hf://org/two")
    assert lorakit.load("hf://org/two/b.safetensors").meta.source_format == "kohya"


def test_offline_reuses_an_output_folder(fake_hub, hub_env, tmp_path, monkeypatch):
    files = peft_repo_files(seed=2)
    fake_hub.add_repo("org/a", files)
    out = tmp_path / "mine"
    pull("org/a", output=out)
    fake_hub.requests.clear()
    go_offline(monkeypatch)
    again = pull("org/a", output=out)
    assert again.offline and fake_hub.requests == []
    assert {f.path_in_repo for f in again.files} == ADAPTER_FILES
    assert again.adapter_path.read_bytes() == files["adapter_model.safetensors"]


def test_peft_adapter_in_a_subfolder(fake_hub, hub_env):
    files = peft_repo_files(seed=5)
    fake_hub.add_repo("org/multi", {"README.md": files["README.md"],
                                    "style/adapter_config.json": files["adapter_config.json"],
                                    "style/adapter_model.safetensors": files["adapter_model.safetensors"],
                                    "other/adapter_model.safetensors": b"never fetched"})
    loaded = lorakit.load("hf://org/multi/style")
    assert loaded.meta.base_model == "org/base"  # the config beside the weights was used
    assert_adapters_close(loaded, random_adapter(SHAPES, rank=4, seed=5))
    assert resolve_gets(fake_hub, "org/multi") == {"README.md", "style/adapter_config.json",
                                                    "style/adapter_model.safetensors"}


def test_pulled_to_a_folder_provenance_gets_the_origin_passed_as_data(fake_hub, hub_env, tmp_path):
    """`-o` copies are outside the cache layout: their origin comes from ``PullResult.origins()``, not a global."""
    from lorakit.provenance import make_provenance

    commit = fake_hub.add_repo("org/a", peft_repo_files(seed=3))
    result = pull("org/a", output=tmp_path / "copy")
    weights = result.adapter_path
    assert "repo" not in make_provenance("op", {}, [weights])["inputs"][0]
    (rec,) = make_provenance("op", {}, [weights], origins=result.origins())["inputs"]
    assert rec["repo"] == "org/a" and rec["revision"] == commit
    assert rec["path_in_repo"] == weights.relative_to(result.root).as_posix()
