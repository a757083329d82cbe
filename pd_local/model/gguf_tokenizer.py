"""A GGUF's tokenizer as a Hugging Face `tokenizers` BPE: tokenizer.json and tokenizer_config.json.

Only byte-level BPE ('gpt2') with the smollm / gpt-2 pre-tokenizers is converted; CONTROL tokens
become special tokens, USER_DEFINED ones plain added tokens; no BOS/EOS is ever added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pd_local.model.gguf_reader import WeightsError, get_field

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

def _pre_tokenizer(pre: str, path: Path) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp's 'smollm' pre-tokenizer: every digit on its own, then the GPT-2 regex.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    if pre in ("default", "gpt-2"):
        return byte_level
    raise WeightsError(
        f"{path}: tokenizer pre-tokenizer {pre!r} is not supported (supported: smollm, gpt-2, default)"
    )


def build_tokenizer(reader: Any, path: Path) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, special-token info) from the GGUF's byte-level BPE fields: CONTROL
    tokens become special added tokens, USER_DEFINED ones plain added tokens; no BOS/EOS added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = get_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise WeightsError(
            f"{path}: tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2') is"
        )
    tokens: list[str] = list(get_field(reader, "tokenizer.ggml.tokens") or [])
    merges_raw: list[str] = list(get_field(reader, "tokenizer.ggml.merges") or [])
    types: list[int] = list(get_field(reader, "tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    if not tokens or not merges_raw:
        raise WeightsError(f"{path}: GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise WeightsError(
            f"{path}: {len(tokens)} tokens but {len(types)} token types in the GGUF"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise WeightsError(f"{path}: GGUF token list has duplicate entries")
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise WeightsError(f"{path}: malformed BPE merge {m!r}")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(get_field(reader, "tokenizer.ggml.pre", "default")), path)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(tokens[i], special=(ty == _TOKEN_CONTROL), normalized=False)
        for i, ty in enumerate(types)
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    # add_tokens keeps the vocab id of a token already in the BPE vocab; special-ness comes
    # from the AddedToken flag.
    tok.add_tokens(added)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise WeightsError(
            f"{path}: tokenizer built with {tok.get_vocab_size(with_added_tokens=True)} tokens, "
            f"GGUF lists {len(tokens)}"
        )

    def token_at(key: str) -> str | None:
        idx = get_field(reader, key)
        if idx is None:
            return None
        if not 0 <= int(idx) < len(tokens):
            raise WeightsError(f"{path}: {key} = {idx} is outside the vocabulary")
        return tokens[int(idx)]

    info = {
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "chat_template": get_field(reader, "tokenizer.chat_template"),
        "add_bos_token": bool(get_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(get_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "special_tokens": [tokens[i] for i, ty in enumerate(types) if ty == _TOKEN_CONTROL],
    }
    if info["add_bos_token"] or info["add_eos_token"]:
        # Our chat path never adds BOS/EOS (the template emits what the model needs); a GGUF
        # that asks for it would silently be served differently from llama.cpp.
        raise WeightsError(
            f"{path}: GGUF asks for BOS/EOS to be added to every prompt, which pd_local's "
            f"tokenizer does not do"
        )
    return tok, info


def tokenizer_config(info: dict[str, Any], max_len: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "additional_special_tokens": [
            t for t in info["special_tokens"]
            if t not in (info["bos_token"], info["eos_token"], info["unk_token"], info["pad_token"])
        ],
    }
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if info[key] is not None:
            cfg[key] = info[key]
    if info["chat_template"]:
        cfg["chat_template"] = info["chat_template"]
    return cfg
