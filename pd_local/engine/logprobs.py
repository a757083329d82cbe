"""Logprobs as the API reports them (as vLLM): log-softmax of the sampler's logits before
temperature, of a chosen token and the top k; computed only for rows that asked."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from dataclasses import dataclass

import torch

if TYPE_CHECKING:
    from pd_local.engine.scheduler import PrefillChunk

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs
PROMPT_ROWS_PER_PASS = 256  # lm_head over a long prompt in slices: [256, V] fp32 at a time


@dataclass(frozen=True)
class Logprob:
    """A position's token (sampled, or the prompt's next) and logprob; the top k, best first."""

    token_id: int
    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


def logprobs_of(logits: torch.Tensor, targets: list[int], k: int) -> list[Logprob]:
    """logits [R, V] -> one Logprob per row for targets[r], with the row's top k (0 <= k <= 20)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = lp.gather(1, torch.tensor(targets, device=lp.device).view(-1, 1)).view(-1).tolist()
    if not k:
        return [Logprob(t, c) for t, c in zip(targets, chosen)]
    top = torch.topk(lp, k, dim=-1)  # sorted, most likely first
    ids, vals = top.indices.tolist(), top.values.tolist()
    return [Logprob(t, c, tuple(i), tuple(v)) for t, c, i, v in zip(targets, chosen, ids, vals)]


def prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: list[int],
                    k: int) -> list[Logprob]:
    """hidden [R, hidden] of prompt positions p.. -> logprobs of targets[r] = prompt[p + r + 1]."""
    out: list[Logprob] = []
    for a in range(0, hidden.shape[0], PROMPT_ROWS_PER_PASS):
        b = min(a + PROMPT_ROWS_PER_PASS, hidden.shape[0])
        out += logprobs_of(compute_logits(hidden[a:b]), targets[a:b], k)
    return out


def extend_prompt_logprobs(chunks: Sequence[PrefillChunk], first_row: int, hidden: torch.Tensor,
                           compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Extend the asking sequences' prompt_logprobs from their chunks' rows of a step's hidden
    [T, H], whose prompt rows start at first_row."""
    row = first_row
    for c in chunks:
        k, seq = c.seq.params.prompt_logprobs, c.seq
        first, end = len(seq.prompt_logprobs), min(c.end, len(seq.prompt_ids) - 1)
        if k is not None and first < end:
            if first < c.start:  # no prefix cache for such a sequence: cannot happen
                raise RuntimeError(f"request {seq.req_id}: prompt logprobs from {first}, "
                                   f"chunk starts at {c.start}")
            rows = hidden[row + first - c.start:row + end - c.start]  # positions [first, end)
            seq.prompt_logprobs += prompt_logprobs(compute_logits, rows, seq.prompt_ids[first + 1:end + 1], k)
        row += c.end - c.start
