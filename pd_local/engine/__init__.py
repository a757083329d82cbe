"""One process's inference engine: no ranks, no network, no torch.distributed.

| module | owns | never does |
|---|---|---|
| `engine.py` | `Engine`: one process's model + cache + scheduler; `step()`; the decode-rank entry points `reserve` / `write_prompt_kv` / `add_prefilled` | torch.distributed |
| `scheduler.py` | waiting/running queues, prefill token budget, admission by free blocks, preemption by recompute | torch.distributed, tensors |
| `kv_cache.py` | `BlockAllocator` (pure Python), `blocks_for`, `slots_for` | torch |
| `sampling.py` | `SamplingParams`, per-request generators, `sample()` | host syncs on the hot path |

Imports `pd_local.model` and the shared `pd_local.config` (`EngineConfig`); never `api`,
`cluster` or `cli`.
"""
