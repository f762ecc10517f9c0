"""Bad input through the CLI: one clear error line naming the file (and module), exit 1, nothing written,
the input's bytes untouched. One case also runs the real ``lorakit`` console script to prove no traceback."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lorakit.io import write_safetensors


def raw_safetensors(path: Path, header: dict | str | bytes, data: bytes = b"") -> Path:
    """Write a safetensors file byte by byte (so that it can be made to lie)."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def kohya_file(path: Path, *, a_rank: int = 4, b_rank: int = 4, fill: float | None = None, out: int = 8,
               inn: int = 6) -> Path:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(a_rank, inn, generator=g)
    if fill is not None and A.numel():
        A[0, 0] = fill
    write_safetensors(path, {
        "lora_unet_mid_block_proj_in.lora_down.weight": A,
        "lora_unet_mid_block_proj_in.lora_up.weight": torch.randn(out, b_rank, generator=g),
        "lora_unet_mid_block_proj_in.alpha": torch.tensor(float(max(a_rank, 1))),
        "lora_unet_mid_block_proj_out.lora_down.weight": torch.randn(2, 8, generator=g),
        "lora_unet_mid_block_proj_out.lora_up.weight": torch.randn(8, 2, generator=g),
    })
    return path


def good_bytes(tmp: Path) -> bytes:
    return kohya_file(tmp / "good-src.safetensors").read_bytes()


def truncated(tmp: Path) -> Path:
    p = tmp / "truncated.safetensors"
    p.write_bytes(good_bytes(tmp)[:-10])
    return p


def corrupt_header(tmp: Path) -> Path:
    return raw_safetensors(tmp / "corrupt.safetensors", b"{this is not json" + b" " * 7)


def lying_offsets(tmp: Path) -> Path:
    header = {"a.lora_down.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "a.lora_up.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}
    return raw_safetensors(tmp / "lying.safetensors", header, b"\0" * 24)


def nan_factor(tmp: Path) -> Path:
    return kohya_file(tmp / "nan.safetensors", fill=math.nan)


def inf_factor(tmp: Path) -> Path:
    return kohya_file(tmp / "inf.safetensors", fill=math.inf)


def rank_mismatch(tmp: Path) -> Path:
    return kohya_file(tmp / "ranks.safetensors", a_rank=4, b_rank=3)


def bad_tucker(tmp: Path) -> Path:
    p = tmp / "tucker.safetensors"
    write_safetensors(p, {"lora_unet_conv_in.lora_down.weight": torch.ones(4, 3, 1, 1),
                          "lora_unet_conv_in.lora_mid.weight": torch.ones(4, 4),
                          "lora_unet_conv_in.lora_up.weight": torch.ones(5, 4, 1, 1)})
    return p


def empty(tmp: Path) -> Path:
    p = tmp / "empty.safetensors"
    p.write_bytes(b"")
    return p


def unknown_format(tmp: Path) -> Path:
    p = tmp / "model.safetensors"
    write_safetensors(p, {"model.layers.0.weight": torch.zeros(2, 2), "model.norm.weight": torch.ones(2)})
    return p


def zero_size(tmp: Path) -> Path:
    return kohya_file(tmp / "zero.safetensors", a_rank=0, b_rank=0)


def duplicate_keys(tmp: Path) -> Path:
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    header = '{"x.lora_down.weight":' + entry + ',"x.lora_down.weight":' + entry + "}"
    return raw_safetensors(tmp / "dupes.safetensors", header + " " * (-len(header) % 8), b"\0" * 4)


def pickle_file(tmp: Path) -> Path:
    p = tmp / "adapter_model.bin"
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, p)
    return p


def bad_peft_config(tmp: Path) -> Path:
    d = tmp / "badcfg"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    write_safetensors(d / "adapter_model.safetensors", {"base_model.model.x.lora_A.weight": torch.ones(2, 3),
                                                        "base_model.model.x.lora_B.weight": torch.ones(3, 2)})
    return d


def peft_dir(tmp: Path, name: str, config: dict, magnitude: torch.Tensor | None = None) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    tensors = {"base_model.model.model.x.lora_A.weight": torch.ones(2, 3),
               "base_model.model.model.x.lora_B.weight": torch.ones(4, 2)}
    if magnitude is not None:
        tensors["base_model.model.model.x.lora_magnitude_vector"] = magnitude
    write_safetensors(d / "adapter_model.safetensors", tensors)
    return d


def nan_magnitude(tmp: Path) -> Path:
    return peft_dir(tmp, "dora-nan", {"use_dora": True}, torch.tensor([1.0, math.nan, 1.0, 1.0]))


def peft_variant(tmp: Path) -> Path:
    return peft_dir(tmp, "alora", {"alora_invocation_tokens": [1, 2]})


def missing_path(tmp: Path) -> Path:
    return tmp / "nowhere" / "missing.safetensors"


def ambiguous_dir(tmp: Path) -> Path:
    d = tmp / "several"
    d.mkdir()
    kohya_file(d / "one.safetensors")
    kohya_file(d / "two.safetensors")
    return d


# name -> (maker, what the error line must say, module named in it or None)
CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...], str | None]] = {
    "truncated": (truncated, ("truncated",), None),
    "corrupt_header": (corrupt_header, ("corrupt header", "not valid JSON"), None),
    "lying_offsets": (lying_offsets, ("offsets",), None),
    "nan": (nan_factor, ("NaN",), "lora_unet_mid_block_proj_in"),
    "inf": (inf_factor, ("Inf",), "lora_unet_mid_block_proj_in"),
    "rank_mismatch": (rank_mismatch, ("ranks differ",), "lora_unet_mid_block_proj_in"),
    "bad_tucker": (bad_tucker, ("lora_mid",), "lora_unet_conv_in"),
    "missing_path": (missing_path, ("no such file",), None),
    "ambiguous_dir": (ambiguous_dir, ("2 *.safetensors files",), None),
    "empty": (empty, ("empty file",), None),
    "unknown_format": (unknown_format, ("tried", "peft", "kohya", "diffusers"), None),
    "zero_size": (zero_size, ("rank 0",), "lora_unet_mid_block_proj_in"),
    "duplicate_keys": (duplicate_keys, ("duplicate key",), None),
    "pickle": (pickle_file, ("refusing to unpickle",), None),
    "nan_magnitude": (nan_magnitude, ("DoRA magnitude contains NaN",), "model.x"),
    "peft_variant": (peft_variant, ("not plain LoRA",), None),
    "bad_peft_config": (bad_peft_config, ("adapter_config.json: not valid JSON",), None),
}


def digest(path: Path) -> str:
    h = hashlib.sha256()
    if not path.exists():
        return "missing"
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def assert_clean_failure(code: int, err: str, src: Path, outdir: Path, before: str, words, module) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert src.name in lines[0], lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    if module:
        assert f"module {module}" in lines[0], lines[0]
    assert len(lines) <= 2 and all(ln.startswith(("error: ", "hint: ")) for ln in lines), err
    assert list(outdir.iterdir()) == [], f"output dir not empty: {list(outdir.iterdir())}"
    assert digest(src) == before, "input changed"


@pytest.mark.parametrize("case", sorted(CASES))
def test_convert_fails_cleanly(cli, tmp_path, case):
    make, words, module = CASES[case]
    src = make(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = digest(src)
    code, _, err = cli("convert", src, "--to", "peft", "-o", outdir / "converted")
    assert_clean_failure(code, err, src, outdir, before, words, module)


@pytest.mark.parametrize("case", ["truncated", "corrupt_header", "empty", "unknown_format", "pickle",
                                  "rank_mismatch", "duplicate_keys", "lying_offsets", "zero_size"])
def test_inspect_fails_cleanly(cli, tmp_path, case):
    make, words, module = CASES[case]
    src = make(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = digest(src)
    code, out, err = cli("inspect", src)
    assert out == ""
    assert_clean_failure(code, err, src, outdir, before, words, module)


@pytest.mark.parametrize("case", ["nan", "inf"])
def test_inspect_norms_names_the_non_finite_module(cli, tmp_path, case):
    make, words, module = CASES[case]
    src = make(tmp_path)
    code, _, err = cli("inspect", src)
    assert code == 0  # header-only: the values are not read
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = cli("inspect", src, "--norms")
    assert_clean_failure(code, err, src, outdir, digest(src), words, module)


def test_output_equal_to_input_is_refused_before_work(cli, tmp_path):
    src = kohya_file(tmp_path / "a.safetensors")
    before = digest(src)
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli("convert", src, "--to", "kohya", "-o", src)
    assert code == 1 and "would overwrite the input" in err and "a.safetensors" in err
    assert digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == listing


def test_similarity_of_one_adapter_says_how_to_call_it(cli, tmp_path):
    code, _, err = cli("similarity", kohya_file(tmp_path / "a.safetensors"))
    assert code == 1 and "at least two adapters" in err and "--union" not in err and "lorakit inspect" in err


def test_pickle_allowed_only_with_flag(cli, tmp_path):
    src = tmp_path / "adapter_model.bin"
    g = torch.Generator().manual_seed(0)
    torch.save({"base_model.model.x.lora_A.weight": torch.randn(2, 3, generator=g),
                "base_model.model.x.lora_B.weight": torch.randn(4, 2, generator=g)}, src)
    code, _, err = cli("inspect", src)
    assert code == 1 and "--allow-pickle" in err
    code, out, _ = cli("inspect", src, "--allow-pickle", "--json")
    assert code == 0 and json.loads(out)["module_count"] == 1


def test_lying_config_rank_tensors_win_and_a_note_says_so(cli, tmp_path):
    d = tmp_path / "lying-config"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
    g = torch.Generator().manual_seed(0)
    write_safetensors(d / "adapter_model.safetensors", {
        "base_model.model.x.lora_A.weight": torch.randn(4, 6, generator=g),
        "base_model.model.x.lora_B.weight": torch.randn(5, 4, generator=g)})
    code, out, _err = cli("inspect", d, "--json")
    report = json.loads(out)
    assert code == 0 and report["ranks"] == {"4": 1}
    # alpha/r with the tensors' rank: 32 / 4.
    assert report["modules"][0]["scale"] == 8.0
    assert any("rank 16" in n and "rank 4" in n and "tensors win" in n for n in report["notes"])


def test_real_console_script_prints_no_traceback(tmp_path):
    script = Path(sys.executable).with_name("lorakit")
    if not script.exists():
        script = shutil.which("lorakit")
    assert script, "the lorakit console script is not installed"
    src = truncated(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = digest(src)
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_DEBUG"}
    proc = subprocess.run([str(script), "convert", str(src), "--to", "kohya", "-o", str(outdir / "x.safetensors")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout == ""
    assert_clean_failure(proc.returncode, proc.stderr, src, outdir, before, ("truncated",), None)


# ---- input that must not hang, recurse or pass unchecked ----------------------------------------------------
# Each case is refused with one line naming the file (and the key as written), exit 1, nothing written. They
# run in-process under a watchdog (a FIFO read would block forever; the test fails instead of hanging), and
# the FIFO case also through the real console script with a subprocess timeout.

DEEP = 100_000  # far beyond any recursion limit


def deep_header(tmp: Path) -> Path:
    nested = "[" * DEEP + "]" * DEEP
    return raw_safetensors(tmp / "deep.safetensors", '{"__metadata__": {"x": ' + nested + "}}")


def deep_config(tmp: Path) -> Path:
    d = peft_dir(tmp, "deepcfg", {})
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "x": ' + "[" * DEEP + "]" * DEEP + "}")
    return d


def deep_metadata_config(tmp: Path) -> Path:
    p = tmp / "deepmeta.safetensors"
    write_safetensors(p, {"base_model.model.x.lora_A.weight": torch.ones(2, 3),
                          "base_model.model.x.lora_B.weight": torch.ones(4, 2)},
                      metadata={"lorakit.peft_config": "[" * DEEP + "]" * DEEP})
    return p


def fifo_file(tmp: Path) -> Path:
    p = tmp / "pipe.safetensors"
    os.mkfifo(p)
    return p


def fifo_config(tmp: Path) -> Path:
    d = peft_dir(tmp, "fifocfg", {})
    (d / "adapter_config.json").unlink()
    os.mkfifo(d / "adapter_config.json")
    return d


def char_device(tmp: Path) -> Path:
    p = tmp / "zero.safetensors"
    p.symlink_to("/dev/zero")  # reading it would never end
    return p


def dir_config(tmp: Path) -> Path:
    d = peft_dir(tmp, "dircfg", {})
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").mkdir()
    return d


def dir_weights(tmp: Path) -> Path:
    d = tmp / "dirweights"
    (d / "adapter_model.safetensors").mkdir(parents=True)
    return d


def symlink_loop(tmp: Path) -> Path:
    (tmp / "loop-b.safetensors").symlink_to(tmp / "loop-a.safetensors")
    (tmp / "loop-a.safetensors").symlink_to(tmp / "loop-b.safetensors")
    return tmp / "loop-a.safetensors"


def config_loop(tmp: Path) -> Path:
    d = peft_dir(tmp, "cfgloop", {})
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").symlink_to(d / "adapter_config.json")
    return d


def config_value(key: str, text: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        d = peft_dir(tmp, f"cfg-{key}", {})
        (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, ' + text + "}")
        return d
    return make


def metadata_config_value(tmp: Path) -> Path:
    p = tmp / "single.safetensors"
    write_safetensors(p, {"base_model.model.x.lora_A.weight": torch.ones(2, 3),
                          "base_model.model.x.lora_B.weight": torch.ones(4, 2)},
                      metadata={"lorakit.peft_config": json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": [4]})})
    return p


HANG_CASES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "deep_header": (deep_header, ("corrupt header", "nested too deeply")),
    "deep_config": (deep_config, ("adapter_config.json", "nested too deeply")),
    "deep_metadata_config": (deep_metadata_config, ("lorakit.peft_config", "nested too deeply")),
    "fifo": (fifo_file, ("FIFO", "not a regular file")),
    "fifo_config": (fifo_config, ("adapter_config.json", "FIFO")),
    "char_device": (char_device, ("character device",)),
    "dir_config": (dir_config, ("adapter_config.json", "a directory")),
    "dir_weights": (dir_weights, ("adapter_model.safetensors", "a directory")),
    "symlink_loop": (symlink_loop, ("symbolic link loop",)),
    "config_loop": (config_loop, ("adapter_config.json", "symbolic link loop")),
    "r_string": (config_value("r", '"r": "8"'), ('key "r"', '"8"', "positive integer")),
    "alpha_null": (config_value("alpha", '"lora_alpha": null'), ('key "lora_alpha"', "null")),
    "alpha_nan": (config_value("nan", '"lora_alpha": NaN'), ('key "lora_alpha"', "NaN")),
    "alpha_inf": (config_value("inf", '"lora_alpha": -Infinity'), ('key "lora_alpha"', "-Infinity")),
    "target_modules_int": (config_value("tm", '"target_modules": 5'), ('key "target_modules"', "5")),
    "rslora_string": (config_value("rs", '"use_rslora": "yes"'), ('key "use_rslora"', "true or false")),
    "rank_pattern_string": (config_value("rp", '"rank_pattern": {"x": "4"}'), ('key "rank_pattern"["x"]',)),
    "alpha_pattern_nan": (config_value("ap", '"alpha_pattern": {"x": NaN}'), ('key "alpha_pattern"["x"]', "NaN")),
    "rank_pattern_list": (config_value("rpl", '"rank_pattern": [4]'), ('key "rank_pattern"', "an object")),
    "rank_pattern_regex": (config_value("rpr", '"rank_pattern": {"(": 4}'),
                           ('key "rank_pattern"["("]', "regular expression")),
    "metadata_config_value": (metadata_config_value, ('lorakit.peft_config: key "lora_alpha"', "a list")),
}


def watched(fn: Callable[[], tuple[int, str, str]], seconds: float = 10.0) -> tuple[int, str, str]:
    """``fn()`` in a worker thread; fails the test (instead of hanging it) when it has not returned in time."""
    import threading

    box: list = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: the input blocked or looped"
    return box[0]


@pytest.mark.parametrize("case", sorted(HANG_CASES))
def test_unreadable_input_refused_at_once(cli, tmp_path, case):
    make, words = HANG_CASES[case]
    src = make(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = digest(src)  # digest() reads regular files only: FIFOs, devices and loops are skipped
    code, _, err = watched(lambda: cli("convert", src, "--to", "peft", "-o", outdir / "converted"))
    assert_clean_failure(code, err, src, outdir, before, words, None)


@pytest.mark.parametrize("case", ["fifo", "symlink_loop", "deep_index"])
def test_apply_refuses_unreadable_base(cli, tmp_path, case):
    adapter = peft_dir(tmp_path, "adapter", {})
    if case == "deep_index":
        base = tmp_path / "base"
        base.mkdir()
        (base / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}")
        words: tuple[str, ...] = ("model.safetensors.index.json", "nested too deeply")
    else:
        base = fifo_file(tmp_path) if case == "fifo" else symlink_loop(tmp_path)
        words = ("FIFO",) if case == "fifo" else ("symbolic link loop",)
    outdir = tmp_path / "out"
    outdir.mkdir()
    code, _, err = watched(lambda: cli("apply", base, adapter, "-o", outdir / "merged"))
    assert_clean_failure(code, err, base, outdir, digest(base), words, None)


def test_output_symlink_loop_refused(cli, tmp_path):
    src = kohya_file(tmp_path / "a.safetensors")
    outdir = tmp_path / "out"
    outdir.mkdir()
    loop = outdir / "loop.safetensors"
    loop.symlink_to(loop)
    code, _, err = watched(lambda: cli("convert", src, "--to", "kohya", "-o", loop))
    assert code == 1 and "symbolic link loop" in err and "Traceback" not in err, err
    assert [p.name for p in outdir.iterdir()] == ["loop.safetensors"] and loop.is_symlink()


def test_real_console_script_refuses_a_fifo_without_blocking(tmp_path):
    script = Path(sys.executable).with_name("lorakit")
    if not script.exists():
        script = shutil.which("lorakit")
    src = fifo_file(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_DEBUG"}
    before = digest(src)
    # A timeout, not a timing assertion: a blocking read would never return (the limit covers interpreter
    # start-up on a loaded machine; the refusal itself takes milliseconds).
    proc = subprocess.run([str(script), "inspect", str(src)], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert proc.stdout == ""
    assert_clean_failure(proc.returncode, proc.stderr, src, outdir, before, ("FIFO",), None)
