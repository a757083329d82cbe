"""KV between instances of different TP sizes (cluster/kv_slices.py): each decode rank gets
every head it owns exactly once, each pair moves only its overlap, and sizes that do not split
the KV heads are refused with the numbers."""

from __future__ import annotations

import pytest

from pd_local.cluster.kv_slices import owned, plan
from pd_local.model.tp import shard
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("kv_heads", [1, 2, 3, 4, 6, 8])
def test_every_decode_rank_gets_exactly_its_heads_from_the_prefill_ranks_holding_them(kv_heads: int) -> None:
    sizes = [t for t in range(1, kv_heads + 1) if kv_heads % t == 0]
    for p_tp in sizes:
        for d_tp in sizes:
            slices = plan(kv_heads, p_tp, d_tp)
            for d in range(d_tp):
                got = sorted(h for s in slices if s.decode == d for h in s.heads)
                assert got == list(owned(kv_heads, d_tp, d)), (p_tp, d_tp, d)  # each once
            for s in slices:
                src, dst = owned(kv_heads, p_tp, s.prefill), owned(kv_heads, d_tp, s.decode)
                assert [src[i] for i in s.src] == list(s.heads) == [dst[i] for i in s.dst]
                assert len(s.heads) > 0  # a pair with nothing to move is not in the plan
            # bytes: the heads a decode instance owns, once, whatever the split
            total = sum(s.num_bytes(10, 64, 30, 2) for s in slices)
            assert total == 2 * kv_heads * 10 * 64 * 30 * 2


def test_smollm2_prefill_tp1_feeds_decode_tp3_and_tp3_feeds_tp1() -> None:
    one_to_three = plan(3, 1, 3)
    assert [(s.prefill, s.decode, list(s.heads), list(s.src), list(s.dst)) for s in one_to_three] == \
        [(0, 0, [0], [0], [0]), (0, 1, [1], [1], [0]), (0, 2, [2], [2], [0])]
    three_to_one = plan(3, 3, 1)
    assert [(s.prefill, s.decode, list(s.heads), list(s.src), list(s.dst)) for s in three_to_one] == \
        [(0, 0, [0], [0], [0]), (1, 0, [1], [0], [1]), (2, 0, [2], [0], [2])]


def test_the_plan_matches_the_heads_a_tp_shard_keeps() -> None:
    """model/tp.py's rank r keeps KV heads owned(H, tp, r): k rows of those heads."""
    whole = tiny_model()  # 2 KV heads of 16
    k_whole = whole.model.layers[0].self_attn.qkv_proj.weight.split([64, 32, 32])[1]
    for r in range(2):
        part = shard(tiny_model(), r, 2)
        k_part = part.model.layers[0].self_attn.qkv_proj.weight.split([32, 16, 16])[1]
        heads = owned(2, 2, r)
        assert k_part.equal(k_whole[heads.start * 16:heads.stop * 16])


@pytest.mark.parametrize("kv_heads, p_tp, d_tp, why", [
    (3, 2, 1, "prefill tensor parallel 2: the model's 3 KV heads do not split over 2 ranks"),
    (3, 1, 9, "decode tensor parallel 9: the model's 3 KV heads do not split over 9 ranks"),
    (4, 1, 0, "decode tensor parallel 0"),
])
def test_sizes_that_do_not_split_the_kv_heads_are_refused_with_the_numbers(kv_heads: int, p_tp: int,
                                                                           d_tp: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        plan(kv_heads, p_tp, d_tp)
