"""``push``: create the repo, upload the adapter in its format with a model card; then pull gives the same bytes."""

from __future__ import annotations

import json
import struct

import lorakit
from lorakit.adapter import AdapterMeta
from lorakit.card import read_card
from lorakit.hub import pull, push
from lorakit.provenance import make_provenance
from lorakit.testing import assert_adapters_close, random_adapter
from tests.hub.conftest import SHAPES, peft_repo_files


def _header_metadata(path) -> dict[str, str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]).get("__metadata__", {})


def test_push_peft_folder_then_pull_gives_the_same_bytes(fake_hub, hub_env, tmp_path, cli):
    folder = tmp_path / "style"
    a = random_adapter(SHAPES, rank=4, seed=11, meta=AdapterMeta(base_model="org/base"))
    lorakit.save(a, folder, format="peft")
    code, out, err = cli("push", folder, "me/style", "--private")
    assert code == 0, err
    assert "pushed to me/style@main" in out
    repo = fake_hub.repos["me/style"]
    assert repo.private
    stored = fake_hub.files("me/style")
    assert set(stored) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    back = pull("me/style")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (back.root / name).read_bytes() == (folder / name).read_bytes()
    assert_adapters_close(lorakit.load(back.adapter_path), a)
    meta = read_card(back.root / "README.md")
    assert meta["base_model"] == "org/base" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    assert {"lora", "base_model:adapter:org/base", "lorakit"} <= set(meta["tags"])
    assert meta["lorakit"]["format"] == "peft"


def test_card_records_provenance_of_hub_inputs(fake_hub, hub_env, tmp_path):
    """convert hf://org/a → file → push: the card names the operation, its parameters and the input's
    repo, commit and sha256."""
    commit = fake_hub.add_repo("org/a", peft_repo_files(seed=2), tags=["peft", "lora"])
    src = pull("org/a")
    out = tmp_path / "style.safetensors"
    prov = make_provenance("scale", {"weight": 0.5, "seed": 7}, [src.adapter_path])
    lorakit.save(0.5 * lorakit.load("hf://org/a"), out, format="kohya", provenance=prov)
    result = push(out, "me/half", base_model="org/base")
    assert fake_hub.files("me/half")["style.safetensors"] == out.read_bytes()
    card = read_card(pull("me/half").root / "README.md")
    p = card["lorakit"]["provenance"]
    assert p["operation"] == "scale" and p["parameters"] == {"weight": 0.5, "seed": 7}
    (inp,) = p["inputs"]
    weights = next(f for f in src.files if f.path_in_repo == "adapter_model.safetensors")
    assert inp["repo"] == "org/a" and inp["revision"] == commit and inp["sha256"] == weights.sha256
    assert "library_name" not in card and card["base_model"] == "org/base"
    assert "| adapter_model.safetensors | org/a |" in result.card and "seed: `7`" in result.card


def test_push_to_a_branch_leaves_main_alone(fake_hub, hub_env, tmp_path):
    folder = tmp_path / "a"
    lorakit.save(random_adapter(SHAPES, rank=2, seed=1), folder, format="peft")
    push(folder, "me/x")
    main_files = dict(fake_hub.files("me/x"))
    other = tmp_path / "b"
    lorakit.save(random_adapter(SHAPES, rank=2, seed=2), other, format="peft")
    result = push(other, "me/x", revision="exp")
    assert result.revision == "exp" and fake_hub.files("me/x", "exp")["adapter_model.safetensors"] != \
        main_files["adapter_model.safetensors"]
    assert fake_hub.files("me/x") == main_files
    assert_adapters_close(lorakit.load("hf://me/x@exp"), random_adapter(SHAPES, rank=2, seed=2))


def test_local_paths_are_removed_before_upload(fake_hub, hub_env, tmp_path):
    folder = tmp_path / "a"
    lorakit.save(random_adapter(SHAPES, rank=2, seed=1, meta=AdapterMeta(base_model="/home/me/models/llama")),
                 folder, format="peft")
    kohya = tmp_path / "k.safetensors"
    lorakit.save(random_adapter(SHAPES, rank=2, seed=1), kohya, format="kohya",
                 metadata={"ss_sd_model_name": "/home/me/sd/v1-5.ckpt", "ss_network_dim": "2"})
    r1 = push(folder, "me/p")
    r2 = push(kohya, "me/k")
    cfg = json.loads(fake_hub.files("me/p")["adapter_config.json"])
    assert cfg["base_model_name_or_path"] is None and r1.sanitized == ["base_model_name_or_path"]
    assert "base_model" not in read_card(fake_hub.files("me/p")["README.md"].decode())
    pulled = pull("me/k").adapter_path
    meta = _header_metadata(pulled)
    assert meta["ss_sd_model_name"] == "v1-5.ckpt" and meta["ss_network_dim"] == "2"
    assert r2.sanitized == ["ss_sd_model_name"] and b"/home/me" not in pulled.read_bytes()
    assert_adapters_close(lorakit.load(pulled), lorakit.load(kohya))  # tensors untouched


def test_dry_run_uploads_nothing(fake_hub, hub_env, tmp_path, cli):
    f = tmp_path / "k.safetensors"
    lorakit.save(random_adapter(SHAPES, rank=2, seed=1), f, format="kohya")
    code, out, err = cli("push", f, "me/k", "--dry-run")
    assert code == 0, err
    assert "plan: push to me/k@main" in out and "me/k" not in fake_hub.repos
    assert fake_hub.requests == []


def test_is_hub_id():
    from lorakit.card import is_hub_id

    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("gpt2")
    for bad in (None, "", "/home/me/llama", "~/m", "./m", "C:\\m", "v1-5-pruned.ckpt", "a/b/c", "sd/x.safetensors"):
        assert not is_hub_id(bad)
