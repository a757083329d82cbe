"""`pd-local bench`: a load generator and metrics tool for any OpenAI-compatible server.

Modules, each with one concern:

- `workloads`: what to send and when (random / jsonl / interference prompts, arrival times).
- `conversation`: the multi-turn chat workload (histories carrying the streamed answers, think
  time, its driver) and TTFT by turn.
- `sse`: a byte-level Server-Sent Events decoder.
- `client`: one streamed request -> one `RequestResult` (TTFT, per-token gaps, errors).
- `runner`: the asyncio driver (arrival schedule, concurrency cap, warm-up, progress).
- `progress`: the progress bar on stderr.
- `metrics`: pure functions: percentiles, run summary, SLO goodput, attainment interpolation.
- `report`: result JSON (vLLM `bench serve` field names) and the stdout table.
- `plots`: optional PNGs (matplotlib, imported only when asked for).
- `head_of_line`: the head_of_line workload's report (short chats' extra wait, streams' gaps,
  in units of the long prompt's TTFT).
- `sweep`: rate sweeps over several targets, SLO attainment and goodput ratio.
- `args`: the flags, their types and cross-checks -> a WorkloadConfig.
- `cli`: the commands; `main(argv) -> int` for `pd-local bench`.

Nothing here imports torch, nor anything of pd_local outside `loadtest/`: the tool must run on a
machine that only has the client extras.
"""
