"""Merging, scaling and applying PEFT-made adapters with bias updates and saved modules: exact where the
operation has a meaning without the base weights, refused with one line where it has not."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import LorakitError

from .conftest import lora_layers, peft, save_base

pytestmark = [pytest.mark.peft, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def assert_refused(code: int, err: str, outdir, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert len(lines) <= 2, err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert list(outdir.iterdir()) == []


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_bias_updates_merge_exactly(maker, tmp_path, cli, method):
    a, b = maker("lora_bias", 1), maker("lora_bias", 2)
    out = tmp_path / "merged"
    extra = ["--rank", "8"] if method == "svd" else []  # rank 8 = 4 + 4: the svd merge is exact too
    code, _, err = cli("merge", a.path, b.path, "-w", "0.3,0.7", "-m", method, *extra, "-o", out)
    assert code == 0, err
    merged = peft.PeftModel.from_pretrained(a.fresh_base(), out).eval()
    la, lb = lora_layers(a.model), lora_layers(b.model)
    for name, layer in lora_layers(merged).items():
        want = 0.3 * la[name].get_delta_weight("default") + 0.7 * lb[name].get_delta_weight("default")
        got = layer.get_delta_weight("default")
        assert float((got - want).norm() / want.norm()) <= 1e-10, name

        def bias(x):
            return x.lora_B["default"].bias.detach() * x.scaling["default"]

        torch.testing.assert_close(bias(layer), 0.3 * bias(la[name]) + 0.7 * bias(lb[name]), rtol=1e-12, atol=1e-14)


def test_bias_updates_refused_by_nonlinear_merges(maker, tmp_path, cli):
    a, b = maker("lora_bias", 1), maker("lora_bias", 2)
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = cli("merge", a.path, b.path, "-m", "ties", "--density", "0.5", "-o", outdir / "m")
    assert_refused(code, err, outdir, "ties", "lora_bias", a.path.name, "module ")


def test_python_algebra_carries_bias_updates(maker):
    a, b = lorakit.load(maker("lora_bias", 1).path), lorakit.load(maker("lora_bias", 2).path)
    s = 0.5 * a - b
    for n in a:
        torch.testing.assert_close(s[n].bias, 0.5 * a[n].bias - b[n].bias, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(s[n].delta(torch.float64), 0.5 * a[n].delta(torch.float64) - b[n].delta(torch.float64))


def test_saved_modules_merge_when_weights_sum_to_one(maker, tmp_path, cli):
    a, b = maker("modules_to_save", 1), maker("modules_to_save", 2)
    out = tmp_path / "merged"
    code, _, err = cli("merge", a.path, b.path, "-w", "0.25,0.75", "-o", out)
    assert code == 0, err
    merged = lorakit.load(out)
    ta, tb = lorakit.load(a.path).meta.full_tensors, lorakit.load(b.path).meta.full_tensors
    assert set(merged.meta.full_tensors) == set(ta) and ta
    for n in ta:
        torch.testing.assert_close(merged.meta.full_tensors[n].load(), 0.25 * ta[n].load() + 0.75 * tb[n].load(),
                                   rtol=1e-12, atol=1e-14)
    model = peft.PeftModel.from_pretrained(a.fresh_base(), out).eval()
    lm_head = model.base_model.model.lm_head.modules_to_save["default"].weight.detach()
    torch.testing.assert_close(lm_head, merged.meta.full_tensors["lm_head.weight"].load(), rtol=0, atol=0)


def test_identical_saved_modules_are_kept_exactly(maker, tmp_path, cli):
    a = maker("modules_to_save", 1)
    out = tmp_path / "twice"
    code, _, err = cli("merge", a.path, a.path, "-w", "0.5,0.5", "-o", out)
    assert code == 0, err
    src = lorakit.load(a.path).meta.full_tensors
    for n, t in lorakit.load(out).meta.full_tensors.items():
        assert torch.equal(t.load(), src[n].load()), n


@pytest.mark.parametrize("weights", ["1,1", "0.5,0.4"])
def test_saved_modules_refused_when_weights_do_not_sum_to_one(maker, tmp_path, cli, weights):
    a, b = maker("modules_to_save", 1), maker("modules_to_save", 2)
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = cli("merge", a.path, b.path, "-w", weights, "-o", outdir / "m")
    assert_refused(code, err, outdir, "modules_to_save", "sum to 1", a.path.name)


def test_saved_modules_refused_against_an_adapter_without_them(maker, tmp_path, cli):
    a, b = maker("modules_to_save", 1), maker("plain", 2)
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = cli("merge", a.path, b.path, "-w", "0.5,0.5", "--union", "-o", outdir / "m")
    assert_refused(code, err, outdir, "modules_to_save", b.path.name)


def test_saved_modules_refused_by_quantize_and_scaling(maker, tmp_path, cli):
    a = maker("modules_to_save", 1)
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = cli("quantize", a.path, "--bits", "4", "-o", outdir / "q.safetensors")
    assert_refused(code, err, outdir, "modules_to_save", a.path.name)
    with pytest.raises(LorakitError, match="modules_to_save"):
        _ = 0.5 * lorakit.load(a.path)


def test_apply_at_scale_interpolates_saved_modules(maker, tmp_path, cli):
    a = maker("modules_to_save", 1)
    base = save_base(a.fresh_base(), tmp_path / "base")
    out = tmp_path / "half"
    code, _, err = cli("apply", base, a.path, "--scale", "0.5", "-o", out)
    assert code == 0, err
    got, w = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    adapter = lorakit.load(a.path)
    for n, t in adapter.meta.full_tensors.items():
        torch.testing.assert_close(got[n], w[n] + 0.5 * (t.load() - w[n]), rtol=1e-12, atol=1e-14)
    for n in adapter:
        torch.testing.assert_close(got[f"{n}.weight"], w[f"{n}.weight"] + 0.5 * adapter[n].delta(torch.float64))


@pytest.mark.parametrize(("case", "args", "words"), [
    ("modules_to_save", ["--subtract"], ("--subtract", "modules_to_save")),
    ("dora", ["--scale", "0.5"], ("DoRA", "--scale 1")),
    ("dora", ["--subtract"], ("DoRA",)),
])
def test_apply_refuses_what_has_no_meaning(maker, tmp_path, cli, case, args, words):
    a = maker(case, 1)
    base = save_base(a.fresh_base(), tmp_path / "base")
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = cli("apply", base, a.path, *args, "-o", outdir / "m")
    assert_refused(code, err, outdir, a.path.name, *words)


def test_apply_refuses_lora_bias_on_a_layer_without_bias(maker, tmp_path, cli):
    a = maker("lora_bias", 1)
    base = save_base(a.case.base(), tmp_path / "base")
    sd = load_file(str(base / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v for k, v in sd.items() if not k.endswith("q_proj.bias")}, str(base / "model.safetensors"))
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = cli("apply", base, a.path, "-o", outdir / "m")
    assert_refused(code, err, outdir, "q_proj.bias", "lora_bias")


def test_resize_keeps_bias_updates_exactly(maker, tmp_path, cli):
    a = maker("lora_bias", 1)
    out = tmp_path / "small"
    code, _, err = cli("resize", a.path, "--rank", "2", "-o", out)
    assert code == 0, err
    small = peft.PeftModel.from_pretrained(a.fresh_base(), out).eval()
    src = lora_layers(a.model)
    for name, layer in lora_layers(small).items():
        assert layer.r["default"] == 2
        torch.testing.assert_close(layer.lora_B["default"].bias.detach() * layer.scaling["default"],
                                   src[name].lora_B["default"].bias.detach() * src[name].scaling["default"],
                                   rtol=1e-12, atol=1e-14)


def test_saved_modules_refused_by_nonlinear_merges(maker, tmp_path, cli):
    a = maker("modules_to_save", 1)
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = cli("merge", a.path, a.path, "-w", "0.5,0.5", "-m", "ties", "--density", "0.5", "-o", outdir / "m")
    assert_refused(code, err, outdir, "ties", "modules_to_save", a.path.name)


def test_trainable_tokens_applied_as_peft_merges_them_and_refused_elsewhere(tmp_path, cli):
    from .conftest import randomize, tiny_llama

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                             trainable_token_indices=[1, 5, 7]))
    randomize(model)
    src = tmp_path / "tokens"
    model.save_pretrained(src, save_embedding_layers=False)
    base = save_base(tiny_llama(), tmp_path / "base")
    code, _, err = cli("apply", base, src, "-o", tmp_path / "merged")
    assert code == 0, err
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = model.merge_and_unload().state_dict()
    for k, t in got.items():
        torch.testing.assert_close(t, expected[k], rtol=1e-12, atol=1e-14, msg=lambda m, k=k: f"{k}: {m}")
    assert not torch.equal(got["model.embed_tokens.weight"], load_file(str(base / "model.safetensors"))[
        "model.embed_tokens.weight"])
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = cli("convert", src, "--to", "kohya", "-o", outdir / "k.safetensors")
    assert_refused(code, err, outdir, "trainable_tokens_delta", "kohya", src.name)
    code, _, err = cli("apply", base, src, "--subtract", "-o", outdir / "merged")
    assert_refused(code, err, outdir, "trainable tokens", src.name)
    code, _, err = cli("convert", src, "--to", "peft", "-o", tmp_path / "same")
    assert code == 0, err  # carried through in its own format, and PEFT loads it back
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "same").eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
