"""Safetensors loader: every architecture, tied/untied, single/sharded, and every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pd_local.model.config import ModelConfigError
from pd_local.model.gguf_reader import WeightsError
from pd_local.model.weights import checkpoint_files, load_model, load_weights
from tests.helpers import hf_state_dict, make_tiny_hf_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("sharded", [False, True])
def test_loads_every_parameter_exactly(tmp_path: Path, arch: str, tie: bool, sharded: bool) -> None:
    d = make_tiny_hf_model(tmp_path, arch, tie=tie, max_shard_size="100KB" if sharded else None)
    assert (d / "model.safetensors.index.json").is_file() is sharded
    if sharded:
        assert len(checkpoint_files(d).keys()) > 0 and len(set(checkpoint_files(d).values())) > 1
    model, cfg = load_model(d, dtype=torch.float32, fuse=False)
    assert cfg.architecture.lower().startswith(arch)
    ref = hf_state_dict(d)
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert torch.equal(p, ref[name]), name
    if tie:
        assert "lm_head.weight" not in params
        assert model.lm_head_weight is model.model.embed_tokens.weight
    else:
        assert torch.equal(model.lm_head_weight, ref["lm_head.weight"])
        assert model.lm_head_weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in params
    if arch == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in params
    assert not model.training


def test_dtype_conversion_keeps_rope_buffers_fp32(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama")
    model, _ = load_model(d)  # default bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in model.buffers())
    ref = hf_state_dict(d)
    assert torch.equal(model.model.norm.weight, ref["model.norm.weight"].to(torch.bfloat16))


def test_bf16_checkpoint_to_fp32(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "qwen3", dtype=torch.bfloat16)
    model, _ = load_model(d, dtype=torch.float32, fuse=False)
    ref = hf_state_dict(d)
    assert ref["model.norm.weight"].dtype == torch.bfloat16
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, ref[name].float()), name


def test_tied_checkpoint_with_lm_head_and_inv_freq_is_accepted(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama", tie=True)
    tensors = hf_state_dict(d)
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])  # ignored: tied
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old exporters
    save_file(tensors, str(d / "model.safetensors"))
    model, _ = load_model(d, dtype=torch.float32)
    assert torch.equal(model.lm_head_weight, tensors["model.embed_tokens.weight"])


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama")
    tensors = hf_state_dict(d)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"lacks 1 parameter\(s\), e.g. \['model.layers.1.mlp.down_proj.weight'\]"):
        load_model(d)


def test_untied_config_needs_lm_head(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama", tie=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"\['lm_head.weight'\]"):
        load_model(d)


def test_misshaped_tensor_names_both_shapes(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama")
    tensors = hf_state_dict(d)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(
        WeightsError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\), the model expects \(32, 64\)"
    ):
        load_model(d)


def test_unexpected_tensor_is_an_error(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama")
    tensors = hf_state_dict(d)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # a Qwen2 checkpoint?
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"no parameter for, e.g. \['model.layers.0.self_attn.q_proj.bias'\]"):
        load_model(d)


def test_non_float_tensor_is_an_error(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama")
    tensors = hf_state_dict(d)
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(WeightsError, match="'model.norm.weight' has non-float dtype torch.int32"):
        load_model(d)


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama")
    torch.save(hf_state_dict(d), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"only pickle checkpoints \(pytorch_model.bin\); pd_local loads safetensors only"):
        load_model(d)


def test_no_checkpoint_and_gguf_hints(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama")
    (d / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="has neither model.safetensors nor model.safetensors.index.json$"):
        load_model(d)
    (d / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(WeightsError, match="convert-gguf m.gguf"):
        load_model(d)
    with pytest.raises(WeightsError, match="is a GGUF file; convert it first"):
        checkpoint_files(d / "m.gguf")
    with pytest.raises(WeightsError, match="model directory not found"):
        checkpoint_files(tmp_path / "absent")


def test_sharded_index_naming_a_missing_shard(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama", max_shard_size="100KB")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"names shard {shard.name}, which is missing"):
        load_model(d)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="cannot be read as safetensors"):
        load_model(d)


def test_unsupported_architecture(tmp_path: Path) -> None:
    d = make_tiny_hf_model(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="'GPT2LMHeadModel' is not supported"):
        load_model(d)


def test_load_weights_into_existing_model_keeps_parameter_identity(tmp_path: Path) -> None:
    a = make_tiny_hf_model(tmp_path, "llama", seed=1, name="a")
    b = make_tiny_hf_model(tmp_path, "llama", seed=2, name="b")
    model, _ = load_model(a, dtype=torch.float32, fuse=False)
    before = {n: id(p) for n, p in model.named_parameters()}
    load_weights(model, b, torch.float32)
    assert {n: id(p) for n, p in model.named_parameters()} == before
    assert torch.equal(model.model.embed_tokens.weight, hf_state_dict(b)["model.embed_tokens.weight"])


@pytest.mark.slow
def test_tiny_model_with_smollm2_tokenizer(tmp_path: Path, smollm2_dir: Path) -> None:
    from pd_local.tokenizer import Tokenizer

    d = make_tiny_hf_model(tmp_path, "qwen2", tokenizer_dir=smollm2_dir)
    model, cfg = load_model(d)
    tok = Tokenizer.from_dir(d)
    assert cfg.vocab_size == tok.vocab_size == 49152
    assert max(tok.encode_chat([{"role": "user", "content": "hi"}])) < cfg.vocab_size


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_f32_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from pd_local.model.attention import AttentionMetadata
    from pd_local.tokenizer import Tokenizer

    model, cfg = load_model(smollm2_f32_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = Tokenizer.from_dir(smollm2_f32_dir).encode_chat([{"role": "user", "content": "Name a color."}])
    t = len(ids)
    hidden = model(torch.tensor(ids), torch.arange(t), AttentionMetadata.prefill([t]))
    ours = model.compute_logits(hidden)  # [T, vocab]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_f32_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_smollm2_bf16_loads(smollm2_dir: Path) -> None:
    model, cfg = load_model(smollm2_dir)
    assert cfg.num_layers == 30 and cfg.tie_word_embeddings
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.shape == (49152, 576)


def test_copying_a_dir_keeps_it_loadable(tmp_path: Path) -> None:
    # load_model reads only the files, never absolute paths recorded anywhere.
    d = make_tiny_hf_model(tmp_path, "mistral", max_shard_size="100KB")
    moved = shutil.copytree(d, tmp_path / "moved")
    shutil.rmtree(d)
    model, _ = load_model(moved, dtype=torch.float32)
    assert torch.equal(model.model.norm.weight, hf_state_dict(moved)["model.norm.weight"])


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_change_nothing(tmp_path: Path, arch: str) -> None:
    """load_model fuses q/k/v and gate/up after loading; logits stay bit-identical."""
    from pd_local.model.attention import AttentionMetadata

    d = make_tiny_hf_model(tmp_path, arch, tie=arch != "qwen2")
    plain, _ = load_model(d, dtype=torch.float32, fuse=False)
    fused, _ = load_model(d, dtype=torch.float32)
    assert fused.model.layers[0].self_attn.qkv_proj is not None and fused.model.layers[0].mlp.gate_up_proj is not None
    assert not hasattr(fused.model.layers[0].self_attn, "q_proj")
    ids, pos = torch.arange(40) % 50, torch.cat([torch.arange(15), torch.arange(25)])
    meta = AttentionMetadata.prefill([15, 25])
    assert torch.equal(fused.compute_logits(fused(ids, pos, meta)), plain.compute_logits(plain(ids, pos, meta)))
