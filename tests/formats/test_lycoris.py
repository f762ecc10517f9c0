"""LyCORIS LoHa / LoKr read as exact LoRA factors: dense float64 references, truncation errors, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.errors import LossyOperationWarning, ShapeMismatchError, UnsafeFileError

D = torch.float64


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g(seed), dtype=D)


def save(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def loha(stem: str, out: int, inn: int, r: int, alpha: float | None, seed: int, r2: int | None = None):
    r2 = r2 or r
    t = {f"{stem}.hada_w1_a": rand(out, r, seed=seed), f"{stem}.hada_w1_b": rand(r, inn, seed=seed + 1),
         f"{stem}.hada_w2_a": rand(out, r2, seed=seed + 2), f"{stem}.hada_w2_b": rand(r2, inn, seed=seed + 3)}
    if alpha is not None:
        t[f"{stem}.alpha"] = torch.tensor(alpha)
    s = 1.0 if alpha is None else alpha / r
    ref = s * (t[f"{stem}.hada_w1_a"] @ t[f"{stem}.hada_w1_b"]) * (t[f"{stem}.hada_w2_a"] @ t[f"{stem}.hada_w2_b"])
    return t, ref


def rel_err(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(approx - ref) / torch.linalg.norm(ref))


def test_loha_is_exact_at_rank_r_squared(tmp_path):
    t, ref = loha("lycoris_m", 12, 10, 3, 1.5, seed=0, r2=2)
    a = lorakit.load(save(tmp_path / "x.safetensors", t))
    assert a.meta.source_format == "lycoris"
    assert a.info("lycoris_m").rank == 6 and a.info("lycoris_m").scale == 0.5
    f = a["lycoris_m"]
    assert f.rank == 6
    torch.testing.assert_close(f.delta(D), ref, rtol=1e-10, atol=1e-10)


def test_loha_rank_above_layer_size_is_reduced_without_loss(tmp_path):
    t, ref = loha("lycoris_m", 6, 5, 4, None, seed=3)  # r² = 16 > min(6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyOperationWarning)
        a = lorakit.load(save(tmp_path / "x.safetensors", t))
    assert a.info("lycoris_m").rank == 5 and a["lycoris_m"].rank == 5
    torch.testing.assert_close(a["lycoris_m"].delta(D), ref, rtol=1e-9, atol=1e-9)
    assert any("no alpha" in n for n in a.meta.notes)


def test_loha_tucker_conv(tmp_path):
    out, inn, r, k = 10, 5, 3, 3
    t1, t2 = rand(r, r, k, k, seed=1), rand(r, r, k, k, seed=2)
    w1a, w1b, w2a, w2b = rand(r, out, seed=3), rand(r, inn, seed=4), rand(r, out, seed=5), rand(r, inn, seed=6)
    W1 = torch.einsum("abhw,ao,bi->oihw", t1, w1a, w1b)
    W2 = torch.einsum("abhw,ao,bi->oihw", t2, w2a, w2b)
    ref = (2.0 / r) * (W1 * W2).reshape(out, -1)
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = save(tmp_path / "t.safetensors", {
        f"{stem}.hada_t1": t1, f"{stem}.hada_t2": t2, f"{stem}.hada_w1_a": w1a, f"{stem}.hada_w1_b": w1b,
        f"{stem}.hada_w2_a": w2a, f"{stem}.hada_w2_b": w2b, f"{stem}.alpha": torch.tensor(2.0)})
    a = lorakit.load(path)
    name = "unet.down_blocks.0.resnets.0.conv1"  # SD1 stems are mapped (detected from the stem)
    f = a[name]
    assert f.kind == "conv" and f.kernel == (3, 3) and f.rank == 9
    torch.testing.assert_close(f.delta(D), ref, rtol=1e-10, atol=1e-10)


def test_loha_flattened_conv_gets_its_kernel_from_the_name(tmp_path):
    stem = "lora_unet_down_blocks_0_resnets_0_conv2"
    t, ref = loha(stem, 4, 3 * 9, 2, 1.0, seed=8)
    a = lorakit.load(save(tmp_path / "x.safetensors", t))
    f = a["unet.down_blocks.0.resnets.0.conv2"]
    assert f.kernel == (3, 3) and f.kind == "conv"
    torch.testing.assert_close(f.delta(D), ref, rtol=1e-10, atol=1e-10)
    out = tmp_path / "k.safetensors"
    lorakit.save(a, out, format="kohya")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        assert tuple(fh.get_slice(f"{stem}.lora_down.weight").get_shape()) == (4, 3, 3, 3)


@pytest.mark.parametrize("max_rank", [1, 3, 5])
def test_loha_truncation_error_is_the_reported_error(tmp_path, max_rank):
    t, ref = loha("lycoris_m", 9, 8, 3, 3.0, seed=11)
    with pytest.warns(LossyOperationWarning):
        a = lorakit.load(save(tmp_path / "x.safetensors", t), max_rank=max_rank)
    f = a["lycoris_m"]
    assert f.rank == max_rank == a.info("lycoris_m").rank
    reported = a.meta.format_config["lycoris_truncation_errors"]["lycoris_m"]
    assert abs(rel_err(f.delta(D), ref) - reported) < 1e-9
    S = torch.linalg.svdvals(ref)  # Eckart–Young: the best truncation's error
    assert abs(reported - float((S[max_rank:] ** 2).sum().sqrt() / S.norm())) < 1e-9
    assert any("truncated" in n for n in a.meta.notes)


def lokr_tensors(stem: str, seed: int, *, w1_low: bool, w2: str, alpha: float = 4.0):
    a_, c, b, d, r = 2, 3, 4, 5, 2
    t: dict[str, torch.Tensor] = {f"{stem}.alpha": torch.tensor(alpha)}
    if w1_low:
        t[f"{stem}.lokr_w1_a"], t[f"{stem}.lokr_w1_b"] = rand(a_, r, seed=seed), rand(r, c, seed=seed + 1)
        W1 = t[f"{stem}.lokr_w1_a"] @ t[f"{stem}.lokr_w1_b"]
    else:
        t[f"{stem}.lokr_w1"] = W1 = rand(a_, c, seed=seed)
    kernel = None
    if w2 == "full":
        t[f"{stem}.lokr_w2"] = W2 = rand(b, d, seed=seed + 2)
    elif w2 == "low":
        t[f"{stem}.lokr_w2_a"], t[f"{stem}.lokr_w2_b"] = rand(b, r, seed=seed + 2), rand(r, d, seed=seed + 3)
        W2 = t[f"{stem}.lokr_w2_a"] @ t[f"{stem}.lokr_w2_b"]
    elif w2 == "conv":
        t[f"{stem}.lokr_w2"] = W2c = rand(b, d, 3, 3, seed=seed + 2)
        W2, kernel = W2c.reshape(b, -1), (3, 3)
    else:  # tucker
        t2, w2a, w2b = rand(r, r, 3, 3, seed=seed + 2), rand(r, b, seed=seed + 3), rand(r, d, seed=seed + 4)
        t[f"{stem}.lokr_t2"], t[f"{stem}.lokr_w2_a"], t[f"{stem}.lokr_w2_b"] = t2, w2a, w2b
        W2, kernel = torch.einsum("ijhw,ib,jd->bdhw", t2, w2a, w2b).reshape(b, -1), (3, 3)
    if not w1_low and w2 in ("full", "conv"):
        s = 1.0  # both factors full: alpha is ignored (LyCORIS / ComfyUI)
    else:
        s = alpha / r
    return t, s * torch.kron(W1, W2), kernel, s


@pytest.mark.parametrize("w1_low", [False, True])
@pytest.mark.parametrize("w2", ["full", "low", "conv", "tucker"])
def test_lokr_is_exact(tmp_path, w1_low, w2):
    t, ref, kernel, s = lokr_tensors("lycoris_k", 20, w1_low=w1_low, w2=w2)
    a = lorakit.load(save(tmp_path / "k.safetensors", t))
    f = a["lycoris_k"]
    assert f.kernel == kernel and abs(a.info("lycoris_k").scale - s) < 1e-12
    assert f.rank == a.info("lycoris_k").rank
    torch.testing.assert_close(f.delta(D), ref, rtol=1e-9, atol=1e-9)


def test_lokr_truncation_error_is_the_reported_error(tmp_path):
    t, ref, _, _ = lokr_tensors("lycoris_k", 30, w1_low=False, w2="full")
    with pytest.warns(LossyOperationWarning):
        a = lorakit.load(save(tmp_path / "k.safetensors", t), max_rank=3)
    f = a["lycoris_k"]
    assert f.rank == 3
    reported = a.meta.format_config["lycoris_truncation_errors"]["lycoris_k"]
    assert abs(rel_err(f.delta(D), ref) - reported) < 1e-9
    S = torch.linalg.svdvals(ref)
    assert abs(reported - float((S[3:] ** 2).sum().sqrt() / S.norm())) < 1e-9


def test_mixed_file_converts_to_peft_and_kohya_exactly(tmp_path):
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t, ref_loha = loha(attn, 8, 8, 2, 1.0, seed=40)
    t2, ref_lokr, _, _ = lokr_tensors("lora_unet_down_blocks_0_attentions_0_proj_in", 50, w1_low=True, w2="low")
    t.update(t2)
    A, B = rand(3, 6, seed=60), rand(5, 3, seed=61)
    t.update({f"{te}.lora_down.weight": A, f"{te}.lora_up.weight": B, f"{te}.alpha": torch.tensor(1.5)})
    src = save(tmp_path / "mixed.safetensors", t, {"ss_network_module": "lycoris.kohya"})
    refs = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ref_loha,
            "unet.down_blocks.0.attentions.0.proj_in": ref_lokr,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 0.5 * B @ A}
    a = lorakit.load(src)
    assert set(a) == set(refs)
    for fmt, name in (("peft", "p"), ("kohya", "k.safetensors"), ("diffusers", "d.safetensors")):
        out = tmp_path / name
        lorakit.save(a, out, format=fmt)
        back = lorakit.load(out)
        assert set(back) == set(refs), fmt
        for n, ref in refs.items():
            torch.testing.assert_close(back[n].delta(D), ref, rtol=1e-6, atol=1e-6)


def test_peft_loha_config(tmp_path):
    d = tmp_path / "peft_loha"
    d.mkdir()
    t, ref = loha("base_model.model.layers.0.q_proj", 6, 4, 2, None, seed=70)
    save(d / "adapter_model.safetensors", t)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 2, "alpha": 6,
                                                       "target_modules": ["q_proj"]}))
    a = lorakit.load(d)
    torch.testing.assert_close(a["layers.0.q_proj"].delta(D), 3.0 * ref, rtol=1e-10, atol=1e-10)


def test_peft_lokr_uses_alpha_over_r_even_with_full_factors(tmp_path):
    d = tmp_path / "peft_lokr"
    d.mkdir()
    t, ref, _, _ = lokr_tensors("base_model.model.fc", 80, w1_low=False, w2="full")
    del t["base_model.model.fc.alpha"]
    save(d / "adapter_model.safetensors", t)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LOKR", "r": 4, "alpha": 2}))
    a = lorakit.load(d)
    torch.testing.assert_close(a["fc"].delta(D), 0.5 * ref, rtol=1e-10, atol=1e-10)


def test_pickle_refused_unless_allowed(tmp_path, cli):
    t, ref = loha("lycoris_m", 5, 4, 2, 2.0, seed=90)
    path = tmp_path / "x.bin"
    torch.save(t, path)
    with pytest.raises(UnsafeFileError):
        lorakit.load(path)
    code, _out, err = cli("inspect", path)
    assert code == 1 and "pickle" in err and "--allow-pickle" in err
    a = lorakit.load(path, allow_pickle=True)
    torch.testing.assert_close(a["lycoris_m"].delta(D), ref, rtol=1e-10, atol=1e-10)


def test_lokr_inconsistent_shapes(tmp_path, cli):
    t, _, _, _ = lokr_tensors("lycoris_k", 100, w1_low=True, w2="full")
    t["lycoris_k.lokr_w1_b"] = rand(3, 3, seed=1)  # rank 3 against w1_a's rank 2
    path = save(tmp_path / "bad.safetensors", t)
    with pytest.raises(ShapeMismatchError):
        lorakit.load(path)
    out = tmp_path / "out.safetensors"
    before = path.read_bytes()
    code, _, err = cli("convert", path, "--to", "peft", "-o", out)
    assert code == 1 and "lycoris_k" in err and "LoKr" in err
    assert not out.exists() and path.read_bytes() == before


def test_loha_missing_factor(tmp_path):
    t, _ = loha("lycoris_m", 5, 4, 2, 2.0, seed=3)
    del t["lycoris_m.hada_w2_b"]
    with pytest.raises(lorakit.errors.FormatError, match="hada_w2_b"):
        lorakit.load(save(tmp_path / "x.safetensors", t))


def test_lycoris_is_not_writable(tmp_path):
    t, _ = loha("lycoris_m", 5, 4, 2, 2.0, seed=4)
    a = lorakit.load(save(tmp_path / "x.safetensors", t))
    with pytest.raises(lorakit.errors.FormatError, match="cannot write"):
        lorakit.save(a, tmp_path / "y.safetensors", format="lycoris")
    out = lorakit.save(a, tmp_path / "y")  # default: PEFT
    assert lorakit.load(out).meta.source_format == "peft"


from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.formats.lycoris import loha_factors, lokr_svd
from lorakit.linalg import SVD


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 9), inn=st.integers(1, 9), r1=st.integers(1, 4), r2=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_face_splitting_times_khatri_rao_is_the_hadamard_product(out, inn, r1, r2, seed):
    w1a, w1b, w2a, w2b = rand(out, r1, seed=seed), rand(r1, inn, seed=seed + 1), rand(out, r2, seed=seed + 2), \
        rand(r2, inn, seed=seed + 3)
    B, A = loha_factors(w1a, w1b, w2a, w2b)
    assert B.shape == (out, r1 * r2) and A.shape == (r1 * r2, inn)
    torch.testing.assert_close(B @ A, (w1a @ w1b) * (w2a @ w2b), rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(a=st.integers(1, 5), c=st.integers(1, 5), b=st.integers(1, 5), d=st.integers(1, 5), k=st.integers(1, 30),
       seed=st.integers(0, 2**16))
def test_kron_svd_from_factor_svds(a, c, b, d, k, seed):
    W1, W2 = rand(a, c, seed=seed), rand(b, d, seed=seed + 1)
    svd = lambda W: SVD(*torch.linalg.svd(W, full_matrices=False))
    B, A, err = lokr_svd(svd(W1), svd(W2), k)
    ref = torch.kron(W1, W2)
    S = torch.linalg.svdvals(ref)
    kk = min(k, min(a, c) * min(b, d))  # rank(kron) = rank(W1)·rank(W2)
    assert B.shape[1] == kk
    best = float((S[kk:] ** 2).sum().sqrt() / S.norm())
    assert abs(err - best) < 1e-9 and abs(rel_err(B @ A, ref) - best) < 1e-9


@pytest.mark.parametrize("key,shape", [("lycoris_m.hada_w1_b", (2, 3, 4)), ("lycoris_m.hada_w2_a", (5, 3))])
def test_loha_bad_shapes(tmp_path, key, shape):
    t, _ = loha("lycoris_m", 5, 4, 2, 2.0, seed=5)
    t[key] = torch.zeros(shape, dtype=D)
    with pytest.raises(ShapeMismatchError, match="LoHa"):
        lorakit.load(save(tmp_path / "x.safetensors", t))


def test_lokr_wrong_dimensionality(tmp_path):
    t, _, _, _ = lokr_tensors("lycoris_k", 7, w1_low=True, w2="full")
    t["lycoris_k.lokr_w1_a"] = torch.zeros(2, 2, 2, dtype=D)
    with pytest.raises(ShapeMismatchError, match="LoKr"):
        lorakit.load(save(tmp_path / "x.safetensors", t))


def test_cli_convert_with_max_rank_reports_the_error(tmp_path, cli):
    t, ref = loha("lycoris_m", 9, 8, 3, 3.0, seed=11)
    src = save(tmp_path / "x.safetensors", t)
    out = tmp_path / "y.safetensors"
    code, stdout, err = cli("convert", src, "--to", "kohya", "--max-rank", "2", "-o", out, "--json")
    assert code == 0, err
    assert "truncated" in stdout + err
    # The CLI shows the LossyOperationWarning as one line, not Python's warning format.
    assert any(line.startswith("warning: ") for line in err.splitlines()) and "LossyOperationWarning" not in err
    f = lorakit.load(out)["lycoris_m"]
    S = torch.linalg.svdvals(ref)
    assert f.rank == 2
    assert abs(rel_err(f.delta(D), ref) - float((S[2:] ** 2).sum().sqrt() / S.norm())) < 1e-5
    code, _, err = cli("convert", src, "--to", "kohya", "--max-rank", "0", "-o", tmp_path / "z.safetensors")
    assert code != 0 and not (tmp_path / "z.safetensors").exists()
