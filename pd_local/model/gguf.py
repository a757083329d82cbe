"""Convert a llama GGUF into a Hugging Face directory (config, safetensors, tokenizer files, and
last pd_local_conversion.json, written once the rest is verified), undoing llama.cpp's Q/K rotary
permutation. User errors raise `WeightsError` naming the path. Reading: gguf_reader.py."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pd_local.model.gguf_reader import (WeightsError, dtype_name, get_field, open_gguf, parse_dtype,
                                        require_field)
from pd_local.model.gguf_tokenizer import build_tokenizer, tokenizer_config

logger = logging.getLogger(__name__)

CONVERSION_MANIFEST = "pd_local_conversion.json"
CONVERTER_VERSION = 1

# GGUF tensor name (per block: without the "blk.{i}." prefix) -> HF name.
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _f32_clean(x: float) -> float:
    """GGUF stores floats as f32 (1e-5 reads back as 9.99999974e-06); write the short decimal."""
    return float(str(np.float32(x)))


def read_llama_hparams(reader: Any, path: Path) -> dict[str, Any]:
    """The GGUF's llama.* metadata as a HF LlamaConfig dict (config.json content).

    Raises WeightsError when the architecture is not 'llama' or a required key is missing.
    tie_word_embeddings is set from the tensors: true when the GGUF has no output.weight.
    """
    arch = get_field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(
            f"{path}: GGUF architecture is {arch!r}; only 'llama' GGUF files can be converted"
        )
    n_layers = int(require_field(reader, "llama.block_count", path))
    hidden = int(require_field(reader, "llama.embedding_length", path))
    n_heads = int(require_field(reader, "llama.attention.head_count", path))
    n_kv = int(get_field(reader, "llama.attention.head_count_kv", n_heads))
    head_dim = int(get_field(reader, "llama.attention.key_length", hidden // n_heads))
    rope_dims = int(get_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise WeightsError(
            f"{path}: rotary covers {rope_dims} of {head_dim} head dims (partial rotary is not supported)"
        )
    tokens = get_field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(get_field(reader, "llama.vocab_size", len(tokens)))
    if vocab <= 0:
        raise WeightsError(f"{path}: GGUF has neither llama.vocab_size nor tokenizer.ggml.tokens")
    rope_theta = _f32_clean(get_field(reader, "llama.rope.freq_base", 10000.0))
    if get_field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise WeightsError(
            f"{path}: rope scaling {get_field(reader, 'llama.rope.scaling.type')!r} is not supported "
            f"by this converter"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise WeightsError(
            f"{path}: has rope_freqs.weight (Llama 3.1-style rope scaling), which this converter "
            f"cannot map back to a HF rope_scaling config"
        )
    bos = get_field(reader, "tokenizer.ggml.bos_token_id")
    eos = get_field(reader, "tokenizer.ggml.eos_token_id")
    pad = get_field(reader, "tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(require_field(reader, "llama.feed_forward_length", path)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get_field(reader, "llama.context_length", 2048)),
        "rms_norm_eps": _f32_clean(get_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        # transformers 4.x reads rope_theta, 5.x rope_parameters; ModelConfig reads either.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
    }


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a Q or K weight.

    w: [n_heads * head_dim, in]. llama.cpp stores each head's rows as (head_dim/2, 2) pairs
    interleaved; HF keeps the two rotary halves contiguous, i.e. (2, head_dim/2).
    """
    rows, cols = w.shape
    if rows % (2 * n_heads):
        raise WeightsError(f"Q/K weight with {rows} rows cannot be split into {n_heads} heads")
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, cols)  # [n, hd/2, 2, in] (llama.cpp order)
        .swapaxes(1, 2)                                     # [n, 2, hd/2, in] (HF order)
        .reshape(rows, cols)
    )


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def expected_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape that a Llama checkpoint with this config.json must hold.

    lm_head.weight is expected only when tie_word_embeddings is false.
    """
    h = int(config["hidden_size"])
    ffn = int(config["intermediate_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    hd = int(config.get("head_dim") or h // n_heads)
    vocab = int(config["vocab_size"])
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
    }
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (n_heads * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (n_kv * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (n_kv * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, n_heads * hd)
        shapes[p + "mlp.gate_proj.weight"] = (ffn, h)
        shapes[p + "mlp.up_proj.weight"] = (ffn, h)
        shapes[p + "mlp.down_proj.weight"] = (h, ffn)
    return shapes


def read_tensors(
    reader: Any, config: dict[str, Any], path: Path, dtype: torch.dtype, log_every: int = 0
) -> dict[str, torch.Tensor]:
    """Dequantise every GGUF tensor into a HF-named (out, in) tensor of `dtype`, logging every
    `log_every` (0: each quarter). WeightsError for an unknown name, type or shape."""
    from gguf import quants

    expected = expected_tensor_shapes(config)
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config["num_key_value_heads"])
    out: dict[str, torch.Tensor] = {}
    t0 = time.monotonic()
    total = len(reader.tensors)
    log_every = log_every or max(1, total // 4)
    # A bar only on a terminal (disable=None: off when stderr is not a TTY); the log lines stay.
    bar = tqdm(reader.tensors, desc="dequantise", unit="tensor", disable=None, leave=False)
    for i, t in enumerate(bar, start=1):
        name = _hf_name(t.name)
        if name is None:
            raise WeightsError(f"{path}: GGUF tensor {t.name!r} has no Hugging Face Llama equivalent")
        try:
            w = quants.dequantize(t.data, t.tensor_type)  # float32, (out, in)
        except NotImplementedError as e:
            raise WeightsError(
                f"{path}: cannot dequantise {t.name!r} ({t.tensor_type.name}): {e}"
            ) from e
        want = expected.get(name)
        if want is not None and len(want) == 1:
            w = w.reshape(-1)
        if name.endswith("q_proj.weight"):
            w = _unpermute_qk(w, n_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_qk(w, n_kv)
        if want is None or tuple(w.shape) != want:
            raise WeightsError(
                f"{path}: tensor {t.name!r} -> {name!r} has shape {tuple(w.shape)}, "
                f"config.json implies {want}"
            )
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C")).to(dtype)
        if i % log_every == 0 or i == total:
            logger.info("dequantised %d/%d tensors (%.1f s)", i, total, time.monotonic() - t0)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise WeightsError(
            f"{path}: GGUF lacks {len(missing)} tensor(s) a Llama model needs, e.g. {missing[:3]}"
        )
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, dtype: str | torch.dtype = torch.bfloat16
) -> Path:
    """Convert a llama GGUF into a HF directory at `out_dir` (empty or absent), verified by
    `verify_hf_dir`; not atomic (cli/weights.py renames a temporary directory). Returns
    `out_dir`."""
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise WeightsError(f"output directory {out_dir} exists and is not empty")
    t0 = time.monotonic()
    reader = open_gguf(gguf_path)
    config = read_llama_hparams(reader, gguf_path)
    config["torch_dtype"] = dtype_name(torch_dtype)
    tokenizer, tok_info = build_tokenizer(reader, gguf_path)
    if tokenizer.get_vocab_size(with_added_tokens=True) > config["vocab_size"]:
        raise WeightsError(
            f"{gguf_path}: tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} "
            f"tokens but llama.vocab_size is {config['vocab_size']}"
        )
    logger.info(
        "converting %s: %d layers, hidden %d, %d tensors -> %s (%s)",
        gguf_path, config["num_hidden_layers"], config["hidden_size"], len(reader.tensors),
        out_dir, config["torch_dtype"],
    )
    tensors = read_tensors(reader, config, gguf_path, torch_dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_json(out_dir / "config.json", config)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        tokenizer_config(tok_info, config["max_position_embeddings"]),
    )
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    _write_json(out_dir / "generation_config.json", gen)
    verify_hf_dir(out_dir, dtype=torch_dtype)
    # The manifest goes last: its presence means everything before it was written and verified.
    _write_json(
        out_dir / CONVERSION_MANIFEST,
        {
            "converter_version": CONVERTER_VERSION,
            "source": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size,
            "dtype": config["torch_dtype"],
            "num_tensors": len(expected_tensor_shapes(config)),
        },
    )
    logger.info("converted %s in %.1f s", out_dir, time.monotonic() - t0)
    return out_dir


def verify_hf_dir(model_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Check, from headers and small JSON files only, that `model_dir` holds a complete Llama
    conversion (config, tensor names, shapes and one dtype, tokenizer within vocab_size); return
    config.json's dict, or raise WeightsError naming the first problem."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    from pd_local.model.config import ModelConfig, ModelConfigError

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightsError(f"model directory not found: {model_dir}")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        if not (model_dir / name).is_file():
            raise WeightsError(f"{model_dir} is incomplete: {name} is missing")
    try:
        config = json.loads((model_dir / "config.json").read_text())
        ModelConfig.from_dict(config)
        json.loads((model_dir / "tokenizer_config.json").read_text())
        json.loads((model_dir / "generation_config.json").read_text())
    except (json.JSONDecodeError, ModelConfigError) as e:
        raise WeightsError(f"{model_dir}: bad JSON/config: {e}") from e
    expected = expected_tensor_shapes(config)
    st_path = model_dir / "model.safetensors"
    try:
        with safe_open(str(st_path), framework="pt") as f:
            names = set(f.keys())
            dtypes = set()
            for name in names & set(expected):
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if shape != expected[name]:
                    raise WeightsError(
                        f"{st_path}: tensor {name!r} has shape {shape}, config implies {expected[name]}"
                    )
                dtypes.add(sl.get_dtype())
    except WeightsError:
        raise
    except Exception as e:  # safetensors raises its own error type for a truncated header
        raise WeightsError(f"{st_path} cannot be read: {e}") from e
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        raise WeightsError(f"{st_path}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    st_dtype_names = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
    found = {st_dtype_names.get(d) for d in dtypes}
    if len(found) != 1 or None in found:
        raise WeightsError(f"{st_path}: tensors have mixed or unsupported dtypes {sorted(dtypes)}")
    if dtype is not None and found != {dtype}:
        raise WeightsError(f"{st_path}: tensors are {sorted(dtypes)}, expected {dtype}")
    try:
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception as e:
        raise WeightsError(f"{model_dir / 'tokenizer.json'} cannot be loaded: {e}") from e
    if tok.get_vocab_size(with_added_tokens=True) > int(config["vocab_size"]):
        raise WeightsError(
            f"{model_dir}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, "
            f"more than vocab_size {config['vocab_size']}"
        )
    return config


def read_manifest(model_dir: str | Path) -> dict[str, Any] | None:
    """The conversion manifest written last by `convert_gguf`, or None when absent/unreadable."""
    path = Path(model_dir) / CONVERSION_MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None

