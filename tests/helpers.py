"""Reusable fixture builders: tiny HF model directories, tiny GGUF files, toy tokenizers.

Everything here writes small files into a directory the caller owns (normally pytest's
tmp_path) and returns the path, so any test module can use them:

    make_tiny_hf_model(tmp_path, arch="qwen2", tie=False)        -> HF dir (random weights)
    make_tiny_hf_model(tmp_path, tokenizer_dir=smollm2_dir)       -> ... with SmolLM2's tokenizer
    make_tiny_gguf(tmp_path / "m.gguf")                           -> (path, expected HF tensors)
    make_byte_fallback_tokenizer_dir(tmp_path)                    -> SentencePiece-style tokenizer
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_HF_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_tiny_hf_model(
    tmp_path: Path,
    arch: str = "llama",
    tie: bool = True,
    dtype: torch.dtype = torch.float32,
    *,
    max_shard_size: str | None = None,
    tokenizer_dir: Path | None = None,
    vocab_size: int | None = None,
    num_layers: int = 2,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Save a small random transformers model of `arch` and return its directory.

    hidden 64, 4 heads / 2 KV heads (head_dim 16), FFN 128. `max_shard_size` (e.g. "100KB")
    makes a sharded checkpoint with model.safetensors.index.json. With `tokenizer_dir`, its
    tokenizer files are copied in and vocab_size defaults to that tokenizer's size (so ids the
    tokenizer produces are valid inputs); otherwise vocab_size defaults to 320 and there is no
    tokenizer.
    """
    import transformers as tf
    from tokenizers import Tokenizer

    if arch not in _HF_CLASSES:
        raise ValueError(f"arch must be one of {sorted(_HF_CLASSES)}, got {arch!r}")
    if vocab_size is None:
        vocab_size = (
            Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
            if tokenizer_dir is not None else 320
        )
    cfg_cls, model_cls = (getattr(tf, n) for n in _HF_CLASSES[arch])
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=tie, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).to(dtype).eval()
    out = Path(tmp_path) / (name or f"tiny-{arch}-{'tied' if tie else 'untied'}"
                            f"{'-sharded' if max_shard_size else ''}")
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / fname).is_file():
                shutil.copy(Path(tokenizer_dir) / fname, out / fname)
    return out


def hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a (single or sharded) safetensors checkpoint, read with safetensors."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

def byte_level_alphabet() -> list[str]:
    """The 256 single-byte tokens of GPT-2 byte-level BPE, in byte order.

    GPT-2's mapping: printable latin-1 bytes stand for themselves; the other 68 bytes (controls,
    space, ...) map to chr(256 + k) in byte order, so 0x20 (space) is 'Ġ' and 0x0A is 'Ċ'.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) \
        | set(range(ord("®"), ord("ÿ") + 1))
    out: list[str] = []
    k = 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + k))
            k += 1
    return out


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF Q/K weights (rows regrouped as (head_dim/2, 2))."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]  # "1 2": only the Digits pre-tokenizer stops it


def make_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    tie: bool = True,
    quant: str = "F32",
    tokenizer_model: str = "gpt2",
    pre: str = "smollm",
    with_chat_template: bool = True,
    seed: int = 0,
) -> tuple[Path, dict[str, np.ndarray]]:
    """Write a tiny GGUF the way llama.cpp's converter would; return (path, expected HF tensors).

    Model: hidden 64, 4 heads, 2 KV heads, FFN 128, vocab = 3 ChatML specials + 256 bytes + 4
    merges. Q/K are stored permuted (llama_cpp_permute), so a converter that forgets to undo
    it fails the comparison with the returned HF-layout tensors. `quant="Q8_0"` quantises the
    2-D matrices (the expected tensors are then the dequantised values).
    """
    import gguf

    rng = np.random.default_rng(seed)
    tokens = TINY_SPECIALS + byte_level_alphabet() + [m.replace(" ", "") for m in TINY_MERGES]
    types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    h, ffn, nh, nkv, hd, vocab = 64, 128, 4, 2, 16, len(tokens)

    hf: dict[str, np.ndarray] = {}
    gg: dict[str, np.ndarray] = {}

    def add(hf_name: str, gguf_name: str, shape: tuple[int, ...], permute_heads: int = 0) -> None:
        w = rng.standard_normal(shape).astype(np.float32) * 0.1
        if len(shape) == 1:
            w = 1.0 + w
        stored = llama_cpp_permute(w, permute_heads) if permute_heads else w
        hf[hf_name], gg[gguf_name] = w, stored

    add("model.embed_tokens.weight", "token_embd.weight", (vocab, h))
    add("model.norm.weight", "output_norm.weight", (h,))
    if not tie:
        add("lm_head.weight", "output.weight", (vocab, h))
    for i in range(n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(p + "input_layernorm.weight", b + "attn_norm.weight", (h,))
        add(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (h,))
        add(p + "self_attn.q_proj.weight", b + "attn_q.weight", (nh * hd, h), permute_heads=nh)
        add(p + "self_attn.k_proj.weight", b + "attn_k.weight", (nkv * hd, h), permute_heads=nkv)
        add(p + "self_attn.v_proj.weight", b + "attn_v.weight", (nkv * hd, h))
        add(p + "self_attn.o_proj.weight", b + "attn_output.weight", (h, nh * hd))
        add(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", (ffn, h))
        add(p + "mlp.up_proj.weight", b + "ffn_up.weight", (ffn, h))
        add(p + "mlp.down_proj.weight", b + "ffn_down.weight", (h, ffn))

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    if with_chat_template:
        w.add_chat_template(CHATML_TEMPLATE)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for (gname, arr), hname in zip(gg.items(), hf):
        if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gname, q, raw_dtype=qtype)
            deq = gguf.quants.dequantize(q, qtype)
            # The expectation is the dequantised stored tensor, un-permuted like HF's layout.
            if gname.endswith("attn_q.weight"):
                deq = _unpermute(deq, nh)
            elif gname.endswith("attn_k.weight"):
                deq = _unpermute(deq, nkv)
            hf[hname] = deq
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path), hf


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def truncate_copy(src: Path, dst: Path, n_bytes: int) -> Path:
    """Copy the first n_bytes of src to dst (a simulated interrupted download)."""
    with open(src, "rb") as f:
        Path(dst).write_bytes(f.read(n_bytes))
    return Path(dst)


# --------------------------------------------------------------------------------------------
# A SentencePiece-style tokenizer with byte-fallback tokens
# --------------------------------------------------------------------------------------------

def make_byte_fallback_tokenizer_dir(tmp_path: Path, name: str = "byte-fallback-tok") -> Path:
    """A Llama-2-style tokenizer dir: BPE with <0xNN> byte-fallback tokens and a Metaspace decoder.

    Vocab: <unk>, <s>, </s>, 256 byte tokens, then '▁' and a few words ('▁hello', '▁world',
    'hello', 'world', '▁你'). Characters outside the vocab (most CJK, emoji) encode as their UTF-8
    bytes through <0xNN> tokens, which is what the incremental detokenizer must reassemble.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello",
             "wo", "wor", "worl", "world", "▁world", "你", "▁你"]
    for wd in words:
        vocab.setdefault(wd, len(vocab))
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "hello"),
              ("w", "o"), ("wo", "r"), ("wor", "l"), ("worl", "d"), ("▁", "world"), ("▁", "你")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    out = Path(tmp_path) / name
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}{{ bos_token + '[' + m['role'] + '] ' + m['content'] + eos_token }}{% endfor %}",
    }))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return out
