"""Logprobs as OpenAI's two APIs spell them: completions' parallel lists, chat's `content`."""

from __future__ import annotations

from typing import Any

from pd_local.engine.logprobs import Logprob
from pd_local.tokenizer import Tokenizer

FLOOR = -9999.0  # JSON has no -inf: a logprob below this is sent as this (as vLLM does)


def _value(x: float) -> float:
    return x if x > FLOOR else FLOOR  # NaN and -inf alike become the floor


def completion_logprobs(tok: Tokenizer, ids: list[int], lps: list[Logprob | None],
                        offset: int = 0) -> dict[str, Any]:
    """{tokens, token_logprobs, top_logprobs, text_offset} for these tokens in order; None for a
    token without one (an echoed prompt's first). top_logprobs maps text to logprob: the top k
    and the token itself (up to k + 1, as vLLM); text offsets count from `offset`."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, lp in zip(ids, lps):
        text = tok.token_text(tid)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {}
        for i, v in zip(lp.top_ids, lp.top_logprobs):
            top.setdefault(tok.token_text(i), _value(v))
        top.setdefault(text, _value(lp.logprob))
        out["token_logprobs"].append(_value(lp.logprob))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tok: Tokenizer, lps: list[Logprob]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: per token its text, logprob, UTF-8 bytes and the top k."""
    def entry(token_id: int, value: float) -> dict[str, Any]:
        raw = tok.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _value(value), "bytes": list(raw)}

    return [{**entry(lp.token_id, lp.logprob),
             "top_logprobs": [entry(i, v) for i, v in zip(lp.top_ids, lp.top_logprobs)]} for lp in lps]
