"""The LyCORIS package as producer: LoCon, LoHa and LoKr modules (Tucker, LoKr ``decompose_both`` and full
w2) built by ``lycoris.modules`` on a tiny diffusers UNet, saved with kohya stems as LyCORIS does. lorakit's ΔW
equals LyCORIS's own (``get_weight``, what its forward adds); the LoRA lorakit converts them to loads in
diffusers' ``load_lora_weights`` (diffusers and kohya keys) with the outputs of the LyCORIS-patched UNet;
``apply`` equals LyCORIS's ``merge_to`` where that is exact (scale 1: its ``get_diff_weight`` applies
``alpha / dim`` twice for LoHa and LoKr) and its forward everywhere."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("lycoris")
pytest.importorskip("peft")

import lorakit
from lorakit.run import RunOptions
from lorakit.verbs.apply import apply_file
from lorakit.verbs.convert import convert
from tests.producers import _diffusion as D

TARGETS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "linear",
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "linear",
    "down_blocks.0.attentions.0.proj_in": "conv 1x1",
    "down_blocks.0.resnets.0.conv1": "conv 3x3",
    "down_blocks.0.resnets.0.time_emb_proj": "linear",
    "down_blocks.1.resnets.0.conv_shortcut": "conv 1x1",
    "up_blocks.1.resnets.0.conv2": "conv 3x3",
}
# case → (module class, kwargs); alpha == lora_dim in "-scale1" cases.
CASES = {
    "locon": ("LoConModule", {"lora_dim": 2, "alpha": 3.0}),
    "locon-tucker": ("LoConModule", {"lora_dim": 2, "alpha": 1.0, "use_tucker": True}),
    "loha": ("LohaModule", {"lora_dim": 2, "alpha": 3.0}),
    "loha-scale1": ("LohaModule", {"lora_dim": 2, "alpha": 2.0}),
    "loha-tucker": ("LohaModule", {"lora_dim": 2, "alpha": 1.5, "use_tucker": True}),
    "lokr": ("LokrModule", {"lora_dim": 2, "alpha": 3.0, "factor": 2, "decompose_both": True}),
    "lokr-tucker": ("LokrModule", {"lora_dim": 1, "alpha": 1.0, "factor": 2, "use_tucker": True}),
    "lokr-full-w2": ("LokrModule", {"lora_dim": 2, "alpha": 5.0, "factor": 2, "full_matrix": True}),
}


def stem(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


@pytest.fixture(scope="module", params=sorted(CASES))
def produced(request, tmp_path_factory):
    import lycoris.modules as lm
    from safetensors.torch import save_file

    cls_name, kwargs = CASES[request.param]
    cls = getattr(lm, cls_name)
    unet = D.tiny_unet()
    base_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(11)
    mods, tensors, deltas = {}, {}, {}
    for name in TARGETS:
        org = unet.get_submodule(name)
        m = cls(stem(name), org, 1.0, **kwargs).double()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        mods[name] = m
        for k, v in m.state_dict().items():
            tensors[f"{stem(name)}.{k}"] = v.detach().clone().contiguous()
        with torch.no_grad():
            d = m.get_diff_weight()[0] if cls_name == "LoConModule" else m.get_weight(m.shape)
        deltas[name] = d.reshape(d.shape[0], -1)
    d = tmp_path_factory.mktemp(request.param)
    save_file(tensors, d / "lycoris.safetensors", {"ss_network_module": "lycoris.kohya"})
    save_file(base_sd, d / "unet.safetensors")
    for m in mods.values():
        m.apply_to()
    out = D.outputs(unet, D.unet_inputs())
    merged = None
    if kwargs["alpha"] == kwargs["lora_dim"] or cls_name == "LoConModule":
        for m in mods.values():
            m.restore()
            m.merge_to(1.0)
        merged = {k: v.clone() for k, v in unet.state_dict().items()}
    return {"case": request.param, "file": d / "lycoris.safetensors", "base": d / "unet.safetensors",
            "delta": deltas, "out": out, "merged": merged, "base_sd": base_sd}


def test_delta_equals_lycoris(produced):
    a = lorakit.load(produced["file"])
    assert a.meta.source_format in ("lycoris", "kohya")
    assert set(a) == {"unet." + n for n in TARGETS}
    for n, d in produced["delta"].items():
        assert D.rel_err(a["unet." + n].delta(torch.float64), d) <= D.REL, n


def _diffusers_out(path):
    pipe = D.sd_pipeline(D.tiny_unet(), None)
    pipe.load_lora_weights(str(path))
    return D.outputs(pipe.unet, D.unet_inputs())


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_conversion_loads_in_diffusers(produced, tmp_path, to):
    """LoRA conversions load in diffusers (kohya through its own converter) with LyCORIS's outputs. The base
    checkpoint gives the 1×1 ``proj_in`` its kernel (LoHa/LoKr store it flattened, like a Linear's)."""
    out = tmp_path / f"{to}.safetensors"
    convert(produced["file"], out, to, base=produced["base"])
    D.assert_close_outputs(_diffusers_out(out), produced["out"])


def test_apply_equals_lycoris(produced, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "merged.safetensors"
    apply_file(produced["base"], produced["file"], out, run=RunOptions.resolve("cpu"))
    got = load_file(out)
    for n, d in produced["delta"].items():
        w = produced["base_sd"][n + ".weight"]
        assert D.rel_err(got[n + ".weight"], w + d.reshape(w.shape)) <= D.REL, n
    if produced["merged"] is not None:
        for k, v in produced["merged"].items():
            assert D.rel_err(got[k], v) <= D.REL, k
