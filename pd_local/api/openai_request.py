"""OpenAI request bodies -> validated `GenerationRequest`s; one parser for the server and `generate`.

Every refusal is a `RequestError` that names the offending field (`param`) and carries the HTTP
status the server answers with, so both front doors reject the same input with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pd_local.engine.logprobs import MAX_TOP_LOGPROBS
from pd_local.engine.sampling import SamplingParams
from pd_local.engine.structured import json_grammar, schema_of
from pd_local.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4
MAX_N = 64  # choices per prompt
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for /v1/completions' logprobs (chat's: 20)
MAX_TOKENS_LIMIT = 2**31 - 1  # beyond this a value is an error, not something to clip

# Fields OpenAI defines that we do not implement: refusing beats silently ignoring them.
UNSUPPORTED = {
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "best_of": "best_of is not supported",
    "suffix": "suffix is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "store": "stored completions are not supported",
    "modalities": "only text output is supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this server has no reasoning-effort setting",
    "web_search_options": "web search is not supported",
    "verbosity": "this server has no verbosity setting",
}
# Fields accepted that change nothing here (the values are still checked): who the end user is,
# tags for stored completions, and a prefix-cache hint (the cache is automatic).
NO_EFFECT_STRINGS = ("user", "prompt_cache_key", "safety_identifier")
SERVICE_TIERS = ("auto", "default")
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_STOP_TOKEN_IDS = 64


class RequestError(ValueError):
    """A request we refuse; `status` is the HTTP status, `param` the field at fault."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    kind: Literal["chat", "completion"]
    model: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # top entries per token in the response's logprobs; None: off
    echo: str | None = None  # completions: the prompt's text, sent before the completion's
    score_only: bool = False  # max_tokens 0 with echo: the prompt's logprobs, no completion
    n: int = 1  # choices of this prompt (prefilled once; choice i's seed is seed + i)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {type(v).__name__}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        bounds = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise RequestError(f"'{name}' must be in {bounds}, got {v}", name)
    return float(v)


def _integer(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{name}' must be an integer, got {type(v).__name__}", name)
    return v


def _boolean(body: dict[str, Any], name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(f"'{name}' must be a boolean, got {type(v).__name__}", name)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise RequestError("'stop' must be a string or a list of strings", "stop")
    if len(items) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(items)}", "stop")
    if any(s == "" for s in items):
        raise RequestError("'stop' strings must not be empty", "stop")
    return tuple(items)


def _logprobs(body: dict[str, Any], kind: str) -> tuple[int | None, bool]:
    """(top entries per token or None, echo). Chat: logprobs true + top_logprobs 0-20;
    completions: logprobs 0-5 and echo."""
    if kind == "chat":
        if body.get("echo") not in (None, False):
            raise RequestError("'echo' is a /v1/completions field", "echo", code="unsupported_parameter")
        on = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs")
        if top is not None and not on:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise RequestError(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
        return (top or 0) if on else None, False
    if body.get("top_logprobs") is not None:
        raise RequestError("'top_logprobs' is a chat field; /v1/completions takes 'logprobs': 0-5",
                           "top_logprobs", code="unsupported_parameter")
    k = _integer(body, "logprobs")
    if k is not None and not 0 <= k <= MAX_COMPLETION_LOGPROBS:
        raise RequestError(f"'logprobs' must be in [0, {MAX_COMPLETION_LOGPROBS}], got {k}", "logprobs")
    return k, _boolean(body, "echo")


def _token_ids(body: dict[str, Any], name: str, vocab: int) -> list[int]:
    v = body.get(name)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise RequestError(f"'{name}' must be a list of token ids", name)
    if len(v) > MAX_STOP_TOKEN_IDS or any(not 0 <= t < vocab for t in v):
        raise RequestError(f"'{name}' takes at most {MAX_STOP_TOKEN_IDS} ids in [0, {vocab})", name)
    return v


def _logit_bias(body: dict[str, Any], vocab: int) -> dict[int, float]:
    """OpenAI's {"token id": bias in [-100, 100]}."""
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        raise RequestError(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} "
                           "token id -> bias entries", "logit_bias")
    out: dict[int, float] = {}
    for key, bias in v.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            tid = -1
        if not 0 <= tid < vocab:
            raise RequestError(f"'logit_bias' key {key!r} is not a token id in [0, {vocab})", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise RequestError(f"'logit_bias' of token {key}: a number in [-100, 100], got {bias!r}", "logit_bias")
        out[tid] = float(bias)
    return out


def _response_format(fmt: Any) -> str:
    """The grammar a response_format asks for: "" for text (or none), JSON for json_object and
    json_schema (structured.json_grammar); anything else is refused naming response_format."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return ""
    if kind not in ("json_object", "json_schema"):
        raise RequestError(f"'response_format': type must be text, json_object or json_schema, got {kind!r}",
                           "response_format")
    try:
        return json_grammar(schema_of(fmt))
    except ValueError as e:
        raise RequestError(f"'response_format': {e}", "response_format") from None


def _prompt_ids(body: dict[str, Any], kind: str, tokenizer: Tokenizer) -> list[int]:
    if kind == "chat":
        if "messages" not in body:
            raise RequestError("'messages' is required", "messages")
        try:
            return tokenizer.encode_chat(body["messages"])
        except ValueError as e:
            raise RequestError(str(e), "messages") from None
    if "prompt" not in body:
        raise RequestError("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' must not be empty", "prompt")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"'prompt' token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "prompt")
        return list(prompt)
    raise RequestError("'prompt' must be a non-empty string, a list of token ids, or a list of either", "prompt")


def split_prompts(body: Any) -> list[Any]:
    """A completions body whose `prompt` is a list of strings or of token-id lists -> one body
    per prompt (each its own request, as OpenAI numbers their choices); any other body alone."""
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, list) or not prompt:
        return [body]
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        return [{**body, "prompt": p} for p in prompt]
    return [body]


def parse_request(
    body: Any,
    kind: Literal["chat", "completion"],
    tokenizer: Tokenizer,
    max_model_len: int,
    served_models: tuple[str, ...] = (),
) -> GenerationRequest:
    """Validate an OpenAI chat-completions / completions body and tokenise its prompt.

    max_tokens (or max_completion_tokens) past the context is clipped to what is left, so the
    request ends with finish_reason "length"; a prompt that leaves no room is refused."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, why in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"'{name}': {why}", name, code="unsupported_parameter")
    for name in NO_EFFECT_STRINGS:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(f"'{name}' must be a string", name)
    meta = body.get("metadata")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise RequestError("'metadata' must be an object of strings", "metadata")
    if body.get("service_tier") not in (None, *SERVICE_TIERS):
        raise RequestError(f"'service_tier': only {' or '.join(SERVICE_TIERS)} (one tier here), got "
                           f"{body['service_tier']!r}", "service_tier", code="unsupported_parameter")
    grammar = _response_format(body.get("response_format"))
    n = _integer(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise RequestError(f"'n' must be in [1, {MAX_N}], got {n}", "n")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    if served_models and model is not None and model not in served_models:
        raise RequestError(
            f"model {model!r} does not exist; served: {', '.join(served_models)}",
            "model", code="model_not_found", status=404,
        )
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k")
    if top_k is not None and top_k < -1:
        raise RequestError(f"'top_k' must be -1, 0 (off) or positive, got {top_k}", "top_k")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise RequestError(f"'seed' must be in [0, 2**63), got {seed}", "seed")
    stream = _boolean(body, "stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(opts, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        include_usage = _boolean(opts, "include_usage")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name)
    logprobs, echo = _logprobs(body, kind)
    score_only = echo and max_tokens == 0  # score the prompt, generate nothing
    if n > 1 and echo:
        raise RequestError("'n' > 1 with 'echo' is not supported", "n", code="unsupported_parameter")
    if max_tokens is not None and not score_only and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        lo = "1 (0 only with 'echo')" if kind == "completion" else "1"
        raise RequestError(f"'{name}' must be in [{lo}, {MAX_TOKENS_LIMIT}], got {max_tokens}", name)
    stop = _stop(body)
    ignore_eos = _boolean(body, "ignore_eos")
    presence = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition = _number(body, "repetition_penalty", 1.0, 0.0, 2.0, lo_open=True)
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    min_tokens = _integer(body, "min_tokens") or 0
    if not 0 <= min_tokens <= (max_tokens if max_tokens is not None else MAX_TOKENS_LIMIT):
        raise RequestError(f"'min_tokens' must be in [0, max_tokens], got {min_tokens}", "min_tokens")
    stop_ids = _token_ids(body, "stop_token_ids", tokenizer.vocab_size)
    bias = _logit_bias(body, tokenizer.vocab_size)
    prompt_ids = _prompt_ids(body, kind, tokenizer)
    room = max_model_len - len(prompt_ids)
    if room < 1:
        raise RequestError(
            f"the prompt has {len(prompt_ids)} tokens but the context is {max_model_len} tokens "
            "(at least one must be left to generate)",
            "messages" if kind == "chat" else "prompt", code="context_length_exceeded",
        )
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k or 0, 0),
        seed=seed,
        max_tokens=1 if score_only else min(max_tokens or room, room),  # score_only: one, dropped
        ignore_eos=ignore_eos,
        stop_token_ids=tuple(stop_ids),
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo else None,
        presence_penalty=presence,
        frequency_penalty=frequency,
        repetition_penalty=repetition,
        min_tokens=min_tokens,
        min_p=min_p,
        logit_bias_ids=tuple(bias),
        logit_bias_values=tuple(bias.values()),
        grammar=grammar,
    )
    echo_text = None
    if echo:
        prompt = body["prompt"]
        echo_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids, skip_special_tokens=False)
    return GenerationRequest(kind, model, prompt_ids, params, stop, stream, include_usage,
                             logprobs, echo_text, score_only, n)
