"""PEFT LoHa and LoKr as producers, on Linear and Conv2d layers (3×3 and 1×1, with and without
``use_effective_conv2d``, LoKr with ``decompose_both`` and full-rank w2): lorakit's ΔW equals PEFT's
``get_delta_weight`` (float64, relative error ≤ 1e-5); the plain LoRA lorakit converts them to loads in
``PeftModel.from_pretrained`` with equal outputs; ``apply`` equals PEFT's ``merge_and_unload``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import lorakit
from lorakit.run import RunOptions
from lorakit.verbs.apply import apply_file
from tests.producers._diffusion import REL, rel_err

pytestmark = pytest.mark.peft
TARGETS = ["conv", "pw", "lin", "conv5"]


class Tiny(nn.Module):
    """Conv2d 3×3, Conv2d 1×1, a non-square 5×3 Conv2d and a Linear: the layer kinds LoHa/LoKr adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.pw = nn.Conv2d(6, 8, 1)
        self.conv5 = nn.Conv2d(8, 4, (5, 3), padding=(2, 1))
        self.lin = nn.Linear(4 * 6 * 6, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv5(self.pw(torch.tanh(self.conv(x))))
        return self.lin(h.flatten(1))


def base_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().double().eval()


X = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

CASES = {
    "loha": ("LoHaConfig", {"r": 2, "alpha": 3, "rank_pattern": {"lin": 3}, "alpha_pattern": {"pw": 5}}),
    "loha-effective-conv2d": ("LoHaConfig", {"r": 2, "alpha": 4, "use_effective_conv2d": True}),
    "lokr": ("LoKrConfig", {"r": 2, "alpha": 3, "alpha_pattern": {"conv": 7}}),
    "lokr-decompose-both": ("LoKrConfig", {"r": 2, "alpha": 5, "decompose_both": True, "decompose_factor": 2}),
    "lokr-effective-conv2d": ("LoKrConfig", {"r": 1, "alpha": 2, "use_effective_conv2d": True}),
    "lokr-full-w2": ("LoKrConfig", {"r": 64, "alpha": 3}),  # r beyond the factor sizes: w2 stored full
}


def _randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(t in n for t in ("hada_", "lokr_")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


@pytest.fixture(scope="module", params=sorted(CASES))
def produced(request, tmp_path_factory):
    cls_name, kwargs = CASES[request.param]
    cfg = getattr(peft, cls_name)(target_modules=TARGETS, init_weights=False, **kwargs)
    model = peft.get_peft_model(base_model(), cfg)
    _randomize(model, seed=7)
    model.eval()
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d / "adapter")
    base_dir = d / "base"
    base_dir.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in base_model().state_dict().items()}, base_dir / "model.safetensors")
    deltas = {}
    for name, m in model.named_modules():
        if hasattr(m, "get_delta_weight") and hasattr(m, "active_adapters") and name.endswith(tuple(TARGETS)):
            deltas[name.removeprefix("base_model.model.")] = m.get_delta_weight("default").detach()
    with torch.no_grad():
        out = model(X)
        merged = model.merge_and_unload().state_dict()
    return {"case": request.param, "dir": d / "adapter", "base": base_dir / "model.safetensors", "delta": deltas,
            "out": out, "merged": merged}


def test_delta_equals_peft(produced):
    a = lorakit.load(produced["dir"])
    assert set(a) == set(produced["delta"])
    for n, d in produced["delta"].items():
        assert rel_err(a[n].delta(torch.float64), d.reshape(d.shape[0], -1)) <= REL, n


def _load_lora(path):
    from peft import PeftModel

    m = PeftModel.from_pretrained(base_model(), str(path)).eval()
    with torch.no_grad():
        return m(X)


def test_lora_conversion_loads_in_peft(produced, tmp_path):
    """With ``base=`` the base checkpoint, every conv keeps its kernel (also when PEFT stored it flattened)."""
    from lorakit.verbs.convert import convert

    out = tmp_path / "lora"
    convert(produced["dir"], out, "peft", base=produced["base"])
    assert rel_err(_load_lora(out), produced["out"]) <= REL


def test_lora_conversion_without_base(produced, tmp_path):
    """Without a base, kernels the file stores (Tucker / full w2 / 4-D factors) are kept and PEFT loads the
    LoRA; a flattened 3×3 kernel cannot be known, and PEFT refuses that file (size mismatch), never loads it
    wrong."""
    from lorakit.verbs.convert import convert

    out = tmp_path / "lora"
    convert(produced["dir"], out, "peft")
    a = lorakit.load(out)
    flat = [n for n in ("conv", "pw", "conv5") if a.info(n).kind != "conv"]
    if not flat:
        assert rel_err(_load_lora(out), produced["out"]) <= REL
    else:
        with pytest.raises(RuntimeError, match="size mismatch"):
            _load_lora(out)


def test_apply_equals_merge_and_unload(produced, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "merged.safetensors"
    apply_file(produced["base"], produced["dir"], out, run=RunOptions.resolve("cpu"))
    got = load_file(out)
    for k, v in produced["merged"].items():
        assert rel_err(got[k], v) <= REL, k
