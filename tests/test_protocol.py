"""cluster/messages.py without processes: every message round-trips through an int64 tensor, floats
bit-exact, and malformed tensors fail with a message that says what is wrong."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_local.cluster.messages import (MAGIC, MESSAGE_TYPES, Abort, MigrateOut, Migrated, Paused, SendKV, Stay, DType, Fatal, FinishReason,
                                       Heartbeat, KVEntry, KVHeader, Kind, Prefill, PrefillDone,
                                       ProtocolError, PromptLogprobs, Ready, RejectReason, Rejected, Reserve,
                                       Reserved, Shutdown, Stats, TokenEntry, Tokens,
                                       TransferMode, TransferRecord, decode, encode, pack,
                                       unpack)
from pd_local.cluster.codec import float_to_word, word_to_float
from pd_local.engine.events import Load
from pd_local.engine.step_cost import StepCost
from pd_local.engine.logprobs import Logprob
from pd_local.engine.sampling import SamplingParams

i64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
ids = st.integers(min_value=0, max_value=(1 << 62))
tok = st.integers(min_value=0, max_value=1 << 20)
small = st.integers(min_value=0, max_value=1 << 30)
# Any float64, NaN and infinities included: the wire must keep the exact bits.
any_float = st.floats(allow_nan=True, allow_infinity=True)
token_lists = st.lists(tok, max_size=600).map(tuple)

finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def samplings(draw: st.DrawFn) -> SamplingParams:
    """Any valid SamplingParams (the wire validates them again as it reads them)."""
    bias = draw(st.lists(st.tuples(tok, st.floats(-100, 100)), max_size=6))
    top = st.none() | st.integers(0, 20)
    return SamplingParams(
        draw(st.floats(0, 100)), draw(st.floats(1e-6, 1)), draw(small), draw(st.none() | st.integers(0, 2**63 - 1)),
        draw(st.integers(1, 1 << 30)), draw(st.lists(tok, max_size=8).map(tuple)), draw(st.booleans()),
        draw(top), draw(top), draw(finite), draw(finite), draw(st.floats(1e-6, 100)), draw(small),
        draw(st.floats(0, 1)), tuple(b[0] for b in bias), tuple(b[1] for b in bias), draw(st.text(max_size=40)))



logprobs = st.builds(Logprob, tok, any_float, st.lists(tok, max_size=5).map(tuple),
                     st.lists(any_float, max_size=5).map(tuple))
token_entries = st.builds(TokenEntry, ids, tok, st.booleans(), st.none() | st.sampled_from(FinishReason), small,
                          st.lists(logprobs, max_size=1).map(tuple),
                          st.lists(logprobs, max_size=30).map(tuple))
loads = st.builds(Load, small, small, small, small, small, small, small,
                  st.builds(StepCost, any_float, any_float, any_float))
records = st.builds(TransferRecord, ids, small, any_float, any_float)
messages = st.one_of(
    st.builds(Reserve, ids, token_lists, samplings(), st.lists(ids, max_size=4).map(tuple), st.booleans(),
              token_lists, st.lists(st.integers(0, 255), max_size=64).map(tuple)),
    st.builds(MigrateOut, ids, small),
    st.builds(Paused, ids, token_lists, st.lists(st.integers(0, 255), max_size=64).map(tuple)),
    st.builds(SendKV, ids, small, small),
    st.builds(Stay, ids),
    st.builds(Migrated, ids, any_float, small),
    st.builds(Prefill, ids, token_lists, small, small, st.none() | small),
    st.builds(PromptLogprobs, ids, st.lists(logprobs, max_size=40).map(tuple)),
    st.builds(Abort, ids),
    st.builds(KVHeader, st.lists(st.builds(KVEntry, ids, small, small, st.booleans(), small),
                                 max_size=20).map(tuple),
              small, small, small, small, st.sampled_from(DType), st.sampled_from(TransferMode)),
    st.builds(Tokens, st.lists(token_entries, max_size=80).map(tuple), loads, any_float,
              st.lists(records, max_size=5).map(tuple)),
    st.builds(Reserved, ids, any_float),
    st.builds(Rejected, ids, st.sampled_from(RejectReason)),
    st.builds(PrefillDone, ids, any_float, any_float, small),
    st.builds(Stats, loads),
    st.builds(Fatal, small, st.text(max_size=200)),
    st.builds(Ready, small, small),
    st.just(Heartbeat()),
    st.just(Shutdown()),
)


def bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def same(a: object, b: object) -> bool:
    """Equality that treats floats by their bits (NaN == NaN of the same payload, -0.0 != 0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return bits(a) == bits(b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(
            same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip(msg) -> None:
    t = pack(msg)
    assert t.dtype == torch.int64 and t.dim() == 1 and t.device.type == "cpu"
    assert same(unpack(t), msg)


@given(any_float)
def test_float_bits_exact(x: float) -> None:
    assert bits(word_to_float(float_to_word(x))) == bits(x)


def test_float_edge_cases_bit_exact() -> None:
    nan_payload = struct.unpack("<d", struct.pack("<q", 0x7FF8_0000_DEAD_BEEF))[0]
    for x in (0.0, -0.0, math.inf, -math.inf, nan_payload, 5e-324, 0.1, 1 / 3, 0.7):
        got = unpack(pack(PrefillDone(1, x, x)))
        assert bits(got.t_start) == bits(x) and bits(got.t_end) == bits(x)


def test_seed_none_and_zero_differ() -> None:
    assert unpack(pack(Reserve(1, (5,), SamplingParams(seed=None)))).sampling.seed is None
    assert unpack(pack(Reserve(1, (5,), SamplingParams(seed=0)))).sampling.seed == 0


def test_every_kind_has_a_type() -> None:
    assert set(MESSAGE_TYPES) == set(Kind)


def test_unknown_kind_is_named() -> None:
    with pytest.raises(ProtocolError, match=r"unknown message kind 99 \(known: 1=RESERVE"):
        decode([MAGIC | 99])


def test_missing_magic() -> None:
    with pytest.raises(ProtocolError, match="lacks the message magic"):
        decode([int(Kind.ABORT), 7])


def test_truncated_message() -> None:
    words = encode(Prefill(3, (1, 2, 3, 4), 2))
    with pytest.raises(ProtocolError, match="PREFILL message truncated"):
        decode(words[:-2])


def test_list_length_beyond_message() -> None:
    words = encode(Prefill(3, (1, 2), 2))
    words[2] = 1000  # the prompt's length word
    with pytest.raises(ProtocolError, match="list of 1000"):
        decode(words)


def test_trailing_words() -> None:
    with pytest.raises(ProtocolError, match="ABORT message has 1 trailing words"):
        decode(encode(Abort(1)) + [0])


def test_bad_enum_code() -> None:
    words = encode(Rejected(1, RejectReason.QUEUE_FULL))
    words[-1] = 77
    with pytest.raises(ProtocolError, match="REJECTED: 77 is not a RejectReason"):
        decode(words)
    words = encode(Tokens((TokenEntry(1, 2, True, FinishReason.STOP),), Load(), 0.0))
    assert words[5] == 1  # the entry's finish reason: present, then its place among the members
    words[6] = 9
    with pytest.raises(ProtocolError, match="9 is not a FinishReason"):
        decode(words)


def test_wrong_tensor() -> None:
    with pytest.raises(ProtocolError, match="1-D int64"):
        unpack(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ProtocolError, match="empty message"):
        unpack(torch.zeros(0, dtype=torch.int64))


def test_int_out_of_range_refused_when_packing() -> None:
    with pytest.raises(ProtocolError, match="ABORT: .* is not an int64"):
        pack(Abort(1 << 63))


def test_dtype_codes() -> None:
    for dt in (torch.bfloat16, torch.float32, torch.float16):
        assert DType.of(dt).torch is dt
    with pytest.raises(ProtocolError, match="no wire code"):
        DType.of(torch.int8)
