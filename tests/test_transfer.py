"""transfer.py: KV + hidden transfer over torchrun/gloo (dist_scripts/check_transfer.py does
the checking on each rank), and the header checks in process."""

from __future__ import annotations

import pytest
import torch

from tests.dist_scripts.harness import torchrun
from pd_local.cluster.messages import DType, KVEntry, ProtocolError, TransferMode
from pd_local.cluster.channel import Inbox
from pd_local.cluster.transfer import KVShape, PromptHidden, hand_over_hidden

SHAPE = KVShape(num_layers=30, num_kv_heads=3, head_dim=64, hidden_size=576, dtype=torch.bfloat16)


def test_bytes_per_token_smollm2() -> None:
    assert SHAPE.bytes_per_token == 23040  # docs/design.md: ~23 KB/token for SmolLM2-135M bf16


def test_header_checks() -> None:
    h = SHAPE.header([KVEntry(1, 5), KVEntry(2, 3)], TransferMode.LAYERWISE)
    assert h.num_tokens == 8 and h.dtype is DType.BFLOAT16
    SHAPE.check(h)
    other = KVShape(30, 3, 64, 576, torch.float32)
    with pytest.raises(ProtocolError, match="does not match this rank's model"):
        other.check(h)
    with pytest.raises(ProtocolError, match=">= 1 entry with >= 1 token"):
        SHAPE.check(SHAPE.header([KVEntry(1, 0)], TransferMode.WHOLE))
    with pytest.raises(ProtocolError, match=">= 1 entry"):
        SHAPE.check(SHAPE.header([], TransferMode.WHOLE))


def test_prompt_hidden_carries_the_prefill_ranks_prefix_hit() -> None:
    """The entry that completes a prompt says how many prompt tokens its prefill rank did not
    compute; the decode rank reports that with the first token (which can reach the router
    before the prefill rank's PrefillDone: a max_tokens=1 request once reported 0)."""
    h = SHAPE.header([KVEntry(1, 16, 32, False), KVEntry(2, 10, 48, True, 48), KVEntry(3, 5, 0, True)],
                     TransferMode.WHOLE)
    inbox = Inbox()
    hand_over_hidden(inbox, 0, h, SHAPE, torch.zeros(2, SHAPE.hidden_size, dtype=SHAPE.dtype), 0.1, 5.0)
    got = [inbox.get(0)[1], inbox.get(0)[1]]
    assert inbox.get(0) is None and all(isinstance(x, PromptHidden) for x in got)
    assert [(x.req_id, x.cached_tokens) for x in got] == [(2, 48), (3, 0)]
    assert got[0].record.num_bytes == 58 * SHAPE.bytes_per_token + SHAPE.hidden_size * 2


@pytest.mark.multiproc
def test_transfer_bit_exact_all_modes_and_dtypes() -> None:
    run = torchrun("check_transfer.py", 4, ["--prefill", "1", "--decode", "2"], timeout=120)
    assert run.rc == 0, run.output[-4000:]
    for mode in ("LAYERWISE", "WHOLE"):
        for dtype in ("bfloat16", "float32"):
            assert f"RESULT rank 1: {mode} torch.{dtype}: sent 8 requests" in run.output
    received = run.lines("RESULT rank 2") + run.lines("RESULT rank 3")
    assert len([x for x in received if "bit-exact" in x]) == 8, run.output[-4000:]
    assert run.leftover == []
