"""Structured output (response_format json_object / json_schema) through llguidance: a request's
grammar becomes one matcher per sequence on the rank that samples, whose token mask the sampler
applies before it draws; the matcher then consumes the token drawn."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# whitespace inside JSON: at most one space or newline between tokens (llguidance's default
# allows any run, and a small model can spend its whole budget on it)
JSON_OPTIONS = {"whitespace_flexible": False, "whitespace_pattern": r"[ \n]?"}


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The llguidance grammar of JSON matching `schema` (None: any JSON object); ValueError
    naming what is wrong with the schema."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                     overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"the JSON schema is not valid: {e}") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"the JSON schema is not supported: {messages[0]}")
    return grammar


class GrammarTokenizer:
    """What llguidance needs of a pd_local Tokenizer; the token table and LLTokenizer (49k
    tokens: ~0.2 s) are built at the first grammar, not at start-up, then shared."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.eos_token_id, self.bos_token_id = tok.eos_token_id, tok.bos_token_id
        self.special_token_ids: list[int] = []
        self.tokens: list[bytes] = []  # filled by the first matcher()
        self._ll: Any = None

    def __call__(self, text: bytes | str) -> list[int]:
        return self._tok.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)

    def matcher(self, grammar: str) -> Any:
        import llguidance

        if self._ll is None:
            self.tokens = [self._tok.token_bytes(i) for i in range(self._tok.vocab_size)]
            self._ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(self), n_vocab=len(self.tokens))
        return llguidance.LLMatcher(self._ll, grammar, log_level=0)


def mask_row(matcher: Any, row: torch.Tensor) -> None:
    """row [V] of logits: -inf where the grammar allows no token (in place). A matcher in error
    (it cannot be, as every token it consumes was allowed) leaves the row as it is."""
    if matcher.is_error():
        log.warning("grammar matcher in error, sampling unconstrained: %s", matcher.get_error())
        return
    allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)  # [n]
    keep = torch.zeros(row.shape[0], dtype=torch.bool)
    n = min(allowed.shape[0], row.shape[0])
    keep[:n] = allowed[:n] > 0
    row.masked_fill_(~keep.to(row.device), float("-inf"))


def schema_of(fmt: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's response_format json_schema -> its schema (None for json_object)."""
    if fmt.get("type") == "json_object":
        return None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ValueError("json_schema must be {\"name\": ..., \"schema\": {...}}")
    return spec.get("schema", {})
