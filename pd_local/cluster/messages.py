"""Typed cross-rank messages as 1-D int64 CPU tensors (no pickle): word 0 = MAGIC | kind, then
the fields in order (codec.py). Timestamps are time.monotonic(), shared by the ranks of a host.
The channel that carries them: channel.py."""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from pd_local.cluster.codec import ProtocolError, Reader, Writer, codec
from pd_local.engine.events import Load
from pd_local.engine.logprobs import Logprob
from pd_local.engine.sampling import SamplingParams
from pd_local.engine.scheduler import FinishReason

MAGIC = 0x5044 << 16  # "PD" in the high bits of word 0: a stray tensor is not read as a message


class Kind(enum.IntEnum):
    RESERVE = 1
    PREFILL = 2
    ABORT = 3
    KV_HEADER = 4
    TOKENS = 5
    RESERVED = 6
    REJECTED = 7
    PREFILL_DONE = 8
    STATS = 9
    FATAL = 10
    HEARTBEAT = 11
    SHUTDOWN = 12
    READY = 13
    PROMPT_LOGPROBS = 14
    MIGRATE_OUT = 15
    PAUSED = 16
    SEND_KV = 17
    STAY = 18
    MIGRATED = 19
    STOP_ASKED = 20


class RejectReason(enum.IntEnum):
    PROMPT_TOO_LONG = 1  # could never fit this rank's KV cache / max_model_len
    QUEUE_FULL = 2
    SHUTTING_DOWN = 3
    BAD_REQUEST = 4

    @property
    def text(self) -> str:
        return {
            RejectReason.PROMPT_TOO_LONG: "the prompt does not fit the decode rank's KV cache",
            RejectReason.QUEUE_FULL: "the decode rank's queue is full",
            RejectReason.SHUTTING_DOWN: "the server is shutting down",
            RejectReason.BAD_REQUEST: "the decode rank refused the request (prompt too long for its "
                                      "context or token ids outside the vocabulary)",
        }[self]


class DType(enum.IntEnum):
    BFLOAT16 = 1
    FLOAT32 = 2
    FLOAT16 = 3

    @classmethod
    def of(cls, dtype: torch.dtype) -> DType:
        try:
            return _DTYPE_CODES[dtype]
        except KeyError:
            raise ProtocolError(f"dtype {dtype} has no wire code") from None

    @property
    def torch(self) -> torch.dtype:
        return {DType.BFLOAT16: torch.bfloat16, DType.FLOAT32: torch.float32,
                DType.FLOAT16: torch.float16}[self]


_DTYPE_CODES = {torch.bfloat16: DType.BFLOAT16, torch.float32: DType.FLOAT32,
                torch.float16: DType.FLOAT16}


class TransferMode(enum.IntEnum):
    LAYERWISE = 1
    WHOLE = 2


# --- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserve:
    """Router -> the rank that decodes it: hold KV blocks for this prompt until another rank's
    KV lands (local: prefill it here, then decode)."""

    KIND: ClassVar[Kind] = Kind.RESERVE
    req_id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams  # validated again as it is read
    followers: tuple[int, ...] = ()  # n > 1: the other choices' ids, forked off this one
    local: bool = False
    # a migration: what it generated elsewhere and its generator's state (bytes); its KV follows
    output_ids: tuple[int, ...] = ()
    rng_state: tuple[int, ...] = ()


@dataclass(frozen=True)
class Prefill:
    """Router -> prefill rank, sent only once `decode_rank` has reserved the blocks."""

    KIND: ClassVar[Kind] = Kind.PREFILL
    req_id: int
    prompt_ids: tuple[int, ...]
    decode_rank: int
    skip_tokens: int = 0  # the decode rank holds the KV of [0, skip_tokens) (its prefix cache)
    prompt_logprobs: int | None = None  # send PromptLogprobs with this many top entries


@dataclass(frozen=True)
class Abort:
    """Router -> any rank holding state for the request: free it (exactly once)."""

    KIND: ClassVar[Kind] = Kind.ABORT
    req_id: int


@dataclass(frozen=True)
class KVEntry:
    """One request's share of a transfer: prompt positions [start, start + num_tokens). A prompt
    prefilled in chunks goes as several entries over several transfers (one per prefill step);
    `is_last` marks the one that completes it, and only those carry a hidden state."""

    req_id: int
    num_tokens: int
    start: int = 0
    is_last: bool = True
    # on the entry that completes a prompt: the prompt tokens the prefill rank did not compute
    # (its prefix cache held them), for the first token's usage, which can reach the router
    # before the prefill rank's PrefillDone does
    cached_tokens: int = 0


@dataclass(frozen=True)
class KVHeader:
    """Prefill -> decode on the header link: the next transfer on the data link, one per prefill
    step and decode rank. Its entries, in payload order, split each layer's K and V
    [sum(num_tokens), num_kv_heads, head_dim]; the hidden tensor has `num_hidden` rows."""

    KIND: ClassVar[Kind] = Kind.KV_HEADER
    entries: tuple[KVEntry, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: DType
    mode: TransferMode

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)

    @property
    def num_hidden(self) -> int:
        """Rows of the transfer's hidden tensor: one per entry that completes its prompt."""
        return sum(e.is_last for e in self.entries)


@dataclass(frozen=True)
class TokenEntry:
    req_id: int
    token_id: int
    finished: bool = False
    finish_reason: FinishReason | None = None  # when finished
    # first token: prompt tokens not computed for it (colocated: its own prefix cache; PD: the
    # prefill rank's, from the KV header entry that completed the prompt)
    cached_tokens: int = 0
    logprob: tuple[Logprob, ...] = ()  # the token's (one), when the request asked
    prompt_logprobs: tuple[Logprob, ...] = ()  # first token, colocated: prompt tokens 1..n-1


@dataclass(frozen=True)
class TransferRecord:
    """One request's share of a finished KV transfer, as the decode rank saw it."""

    req_id: int
    num_bytes: int
    seconds: float
    t_end: float  # time.monotonic() when its last tensor arrived


@dataclass(frozen=True)
class Tokens:
    """Decode (or colocated) rank -> router, once per step: every token this step produced,
    plus the rank's load so the router can route without asking."""

    KIND: ClassVar[Kind] = Kind.TOKENS
    entries: tuple[TokenEntry, ...]
    load: Load
    t: float  # time.monotonic() at the end of the step
    transfers: tuple[TransferRecord, ...] = ()


@dataclass(frozen=True)
class Reserved:
    KIND: ClassVar[Kind] = Kind.RESERVED
    req_id: int
    t: float  # time.monotonic() when the blocks were reserved
    held_tokens: int = 0  # prompt tokens whose KV the decode rank holds: not to be sent


@dataclass(frozen=True)
class Rejected:
    KIND: ClassVar[Kind] = Kind.REJECTED
    req_id: int
    reason: RejectReason


@dataclass(frozen=True)
class PrefillDone:
    """Prefill -> router after the step that sent a prompt's last chunk: nothing of it is left.
    (Colocated: with the first token, for the request's timings.)"""

    KIND: ClassVar[Kind] = Kind.PREFILL_DONE
    req_id: int
    t_start: float  # time.monotonic() when its first chunk's step started
    t_end: float  # ... and when its last chunk's compute ended (the sends may still be completing)
    cached_tokens: int = 0  # prompt tokens this rank did not compute (its prefix cache held them)


@dataclass(frozen=True)
class PromptLogprobs:
    """Prefill -> router, before the prompt's hidden state leaves for its decode rank: the
    logprobs of prompt tokens 1..n-1 of a request that asked (Prefill.prompt_logprobs)."""

    KIND: ClassVar[Kind] = Kind.PROMPT_LOGPROBS
    req_id: int
    entries: tuple[Logprob, ...]


@dataclass(frozen=True)
class MigrateOut:
    """Router -> a request's decode rank: stop decoding it (it moves to `dst`); answer Paused."""

    KIND: ClassVar[Kind] = Kind.MIGRATE_OUT
    req_id: int
    dst: int


@dataclass(frozen=True)
class Paused:
    """Decode rank -> router: the request stopped here after these tokens (none: it cannot move)."""

    KIND: ClassVar[Kind] = Kind.PAUSED
    req_id: int
    output_ids: tuple[int, ...]
    rng_state: tuple[int, ...] = ()


@dataclass(frozen=True)
class SendKV:
    """Router -> the paused rank, once `dst` reserved: send the KV dst lacks, then free it."""

    KIND: ClassVar[Kind] = Kind.SEND_KV
    req_id: int
    dst: int
    skip: int  # dst holds [0, skip) (its prefix cache)


@dataclass(frozen=True)
class Stay:
    """Router -> the paused rank: the destination refused; decode it here again."""

    KIND: ClassVar[Kind] = Kind.STAY
    req_id: int


@dataclass(frozen=True)
class Migrated:
    """Destination -> router: the request's KV landed; it decodes here from now on."""

    KIND: ClassVar[Kind] = Kind.MIGRATED
    req_id: int
    t_end: float
    num_bytes: int


@dataclass(frozen=True)
class Stats:
    """Worker -> router when idle (a decode rank's Tokens carry the same numbers when busy)."""

    KIND: ClassVar[Kind] = Kind.STATS
    load: Load


@dataclass(frozen=True)
class StopAsked:
    """Worker -> router: a stop signal reached this rank; drain and stop, as on rank 0's."""

    KIND: ClassVar[Kind] = Kind.STOP_ASKED
    rank: int
    signum: int


@dataclass(frozen=True)
class Fatal:
    """Worker -> router just before the worker exits on an error, so rank 0 can say why."""

    KIND: ClassVar[Kind] = Kind.FATAL
    rank: int
    text: str


@dataclass(frozen=True)
class Ready:
    """Worker -> router once, when its model is loaded and its loop is about to start."""

    KIND: ClassVar[Kind] = Kind.READY
    max_model_len: int  # the longest sequence this rank serves (0: a prefill rank, no limit)
    total_blocks: int  # KV blocks
    threads: int = 0  # torch intra-op threads in effect
    cpus: str = ""  # the affinity mask in effect, e.g. "0-3"


@dataclass(frozen=True)
class Heartbeat:
    """Keeps an idle link's group from timing out; receivers drop it."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT


@dataclass(frozen=True)
class Shutdown:
    """Last message on a link: its receiver thread forwards it and exits."""

    KIND: ClassVar[Kind] = Kind.SHUTDOWN


Message = Union[Reserve, Prefill, Abort, KVHeader, Tokens, Reserved, Rejected, PrefillDone,
                Stats, Fatal, Ready, Heartbeat, Shutdown, PromptLogprobs, MigrateOut, Paused, SendKV,
                Stay, Migrated, StopAsked]
MESSAGE_TYPES: dict[Kind, type] = {cls.KIND: cls for cls in typing.get_args(Message)}


def encode(msg: Message) -> list[int]:
    w = Writer(msg.KIND.name, [MAGIC | msg.KIND])
    codec(type(msg))[0](w, msg)
    return w.words


def decode(words: list[int]) -> Message:
    if not words:
        raise ProtocolError("empty message")
    head = words[0]
    if head & ~0xFFFF != MAGIC:
        raise ProtocolError(f"word 0 = {head:#x} lacks the message magic {MAGIC:#x}: "
                            "not a message (sends and receives out of step?)")
    code = head & 0xFFFF
    try:
        kind = Kind(code)
    except ValueError:
        known = ", ".join(f"{k.value}={k.name}" for k in Kind)
        raise ProtocolError(f"unknown message kind {code} (known: {known})") from None
    r = Reader(kind.name, words, pos=1)
    msg = codec(MESSAGE_TYPES[kind])[1](r)
    if r.pos != len(words):
        raise ProtocolError(f"{kind.name} message has {len(words) - r.pos} trailing words "
                            f"({len(words)} words, parsed {r.pos})")
    return msg


def pack(msg: Message) -> torch.Tensor:
    """msg -> [n] int64 CPU tensor."""
    return torch.tensor(encode(msg), dtype=torch.int64)


def unpack(t: torch.Tensor) -> Message:
    """[n] int64 CPU tensor -> msg; ProtocolError if it is not one."""
    if t.dtype != torch.int64 or t.dim() != 1:
        raise ProtocolError(f"a message is a 1-D int64 tensor, got {t.dtype} {list(t.shape)}")
    return decode(t.tolist())
