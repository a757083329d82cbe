"""One process's inference engine: no ranks, no network, no torch.distributed.

| module | owns | never does |
|---|---|---|
| `engine.py` | `Engine`: one process's model + cache + scheduler; `step()`; the decode-rank entry points `reserve` / `write_prompt_kv` / `add_prefilled`; the prefill rank's `add_prompt` / `prompts_done` | torch.distributed |
| `events.py` | what an engine reports: `TokenEvent`, `PromptDone`, `Load` (the one load record) | hold state |
| `scheduler.py` | waiting/running queues, mixed steps (decode rows + prefill chunks within the prefill token budget), admission by free blocks, preemption by recompute | torch.distributed, tensors |
| `prefill_queue.py` | `PrefillQueue`: which waiting prompts' chunks get a step's prefill budget (fcfs / srpf with aging) | tensors, blocks |
| `step_cost.py` | `StepCost` (a step's ms: base + per decode row + per prompt token), `CostFit` (online fit of its own steps), the prefill budget under a TPOT target | torch |
| `kv_cache.py` | `BlockAllocator` (pure Python), `blocks_for`, `slots_for` | torch |
| `threads.py` | CPU threads and cores per rank: `plan_world` (pure), `apply`, `in_effect` | ranks, the network |
| `sampling.py` | `SamplingParams`, per-request generators, `sample()` | host syncs on the hot path |
| `structured.py` | response_format: a JSON schema -> llguidance grammar; per-sequence matchers' token masks | cost for requests without one |
| `logprobs.py` | `Logprob`, log-softmax of sampled tokens and of prompt rows, only where asked | cost for requests that ask nothing |

Imports `pd_local.model` and the shared `pd_local.config` (`EngineConfig`); never `api`,
`cluster` or `cli`.
"""
