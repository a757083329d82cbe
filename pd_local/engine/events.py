"""What an engine reports: `TokenEvent`, `PromptDone` and `Load` (the one load record)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pd_local.engine.logprobs import Logprob
from pd_local.engine.scheduler import FinishReason
from pd_local.engine.step_cost import StepCost


@dataclass(frozen=True)
class TokenEvent:
    req_id: int
    token_id: int
    finished: bool
    finish_reason: FinishReason | None  # STOP or LENGTH when finished
    cached_tokens: int = 0  # first token: prompt tokens whose KV came from the prefix cache
    logprob: Logprob | None = None  # the token's, when the request asked (params.logprobs)
    prompt_logprobs: tuple[Logprob, ...] = ()  # first token, if asked: prompt tokens 1..n-1
    first: bool = False  # the request's first token (a recompute's next token is not)


@dataclass(frozen=True)
class PromptDone:
    """A prompt prefilled for another rank ran its last chunk (its blocks here are freed)."""

    req_id: int
    send_to: int
    hidden: torch.Tensor  # [hidden]: the last position's final hidden state
    num_tokens: int  # the prompt's
    num_cached: int  # prompt tokens whose KV came from this rank's prefix cache
    prompt_logprobs: tuple[Logprob, ...] | None = None  # when the request asked


@dataclass(frozen=True)
class Load:
    free_blocks: int = 0  # empty or cached: both can be allocated
    total_blocks: int = 0
    running: int = 0  # sequences holding blocks (a prefill rank reports 0)
    waiting: int = 0  # queued for blocks (a prefill rank: its prompts not yet sent)
    queued_tokens: int = 0  # a prefill rank: prompt tokens still to compute
    cached_blocks: int = 0  # free blocks whose KV the prefix cache keeps
    prefix_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache, ever
    cost: StepCost = StepCost()  # its steps' time, fitted (engine/step_cost.py)
    prefill_busy_ms: float = 0.0  # time its steps spent on prompt tokens, since start
    decode_busy_ms: float = 0.0  # ... on decode rows
