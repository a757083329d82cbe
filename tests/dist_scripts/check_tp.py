"""Tensor parallel (model/tp.py) over torchrun + gloo: every rank builds the same tiny model,
keeps its share, and runs (1) one prefill's logits, (2) greedy generation through an Engine,
every rank in lockstep. Rank 0 compares with the whole model and prints
'RESULT tp N: max_logit_diff X tokens_equal B kv_heads K'. With `real DIR DTYPE`: the model in
DIR, ten chat prompts, 'RESULT tp N: same_text S of 10 differ [i, ...]'."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.sampling import SamplingParams
from pd_local.model.attention import AttentionMetadata
from pd_local.model.tp import shard
from tests.tiny_models import hf_tiny, ours_from_hf, random_prompts


def real(model_dir: str, dtype: str) -> None:
    """A real model: greedy text of ten chat prompts, TP vs the whole model."""
    from pd_local.model.weights import load_model
    from pd_local.tokenizer import Tokenizer

    rank, tp = dist.get_rank(), dist.get_world_size()
    dt = getattr(torch, dtype)
    tok = Tokenizer.from_dir(model_dir)
    topics = ["the sea", "a bicycle", "bread", "winter", "a library", "rain", "chess", "tea", "a bridge", "owls"]
    prompts = [tok.encode_chat([{"role": "user", "content": f"Write two sentences about {t}."}]) for t in topics]
    greedy = SamplingParams(temperature=0, max_tokens=32)
    cfg = EngineConfig(kv_cache_gb=0.05, native_linear=False)
    part = shard(load_model(model_dir, dt)[0], rank, tp)
    mine = [ids for ids, _ in Engine(part, cfg, stop_token_ids=tok.stop_token_ids).generate(prompts, [greedy] * 10)]
    if rank == 0:
        whole = load_model(model_dir, dt)[0]
        ref = [ids for ids, _ in Engine(whole, cfg, stop_token_ids=tok.stop_token_ids).generate(prompts, [greedy] * 10)]
        differ = [i for i, (a, b) in enumerate(zip(mine, ref)) if tok.decode(a) != tok.decode(b)]
        sys.stdout.write(f"RESULT tp {tp}: same_text {10 - len(differ)} of 10 differ {differ}\n")
        sys.stdout.flush()


def main() -> None:
    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if sys.argv[1] == "real":
        real(sys.argv[2], sys.argv[3])
        dist.destroy_process_group()
        return
    heads, kv_heads = (int(x) for x in sys.argv[1:3])

    def model() -> torch.nn.Module:
        return ours_from_hf(hf_tiny(num_attention_heads=heads, num_key_value_heads=kv_heads,
                                    hidden_size=16 * heads, intermediate_size=24 * heads, seed=5))
    whole, part = model(), shard(model(), rank, tp)
    prompts = random_prompts([23, 40, 7, 61], seed=9)
    ids = torch.tensor(prompts[1])
    meta = AttentionMetadata.prefill([len(ids)])
    got = part.compute_logits(part(ids, torch.arange(len(ids)), meta))
    want = whole.compute_logits(whole(ids, torch.arange(len(ids)), meta))
    diff = torch.tensor((got - want).abs().max().item())
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)

    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cfg = EngineConfig(num_blocks=96, block_size=4, max_num_seqs=4, max_prefill_tokens=16, native_linear=False)
    mine = [ids for ids, _ in Engine(part, cfg).generate(prompts, [greedy] * len(prompts))]
    ref = [ids for ids, _ in Engine(whole, cfg).generate(prompts, [greedy] * len(prompts))]
    if rank == 0:
        sys.stdout.write(f"RESULT tp {tp}: max_logit_diff {diff.item():.3g} tokens_equal {mine == ref} "
                         f"kv_heads {part.config.num_kv_heads}\n")
        sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
