"""The torchrun world: ranks -> roles, the wire between them, the router and the worker loop.

| module | owns | never does |
|---|---|---|
| `dist.py` | ranks -> roles, every process group, created in one fixed order on every rank | |
| `messages.py` | every typed cross-rank message, `pack` / `unpack` | pickle |
| `codec.py` | the field-driven int64 wire codec: a dataclass's annotations say how each field travels | know message kinds |
| `channel.py` | one control link over a 2-rank gloo group: `Sender`, `Receiver` thread -> `Inbox`, `Heartbeater` (a thread per link) | poll a gloo receive; heartbeat one link from another's thread |
| `kv_slices.py` | which KV heads each (prefill TP rank, decode TP rank) pair moves between instances of different TP sizes | move bytes |
| `transfer.py` | KV + hidden-state sender/receiver, header before payload; the header link read without pause | wait on data whose header has not arrived |
| `ipc.py` | the KV transport per (prefill, decode) device pair; CUDA IPC handles as int64 tensors | pickle |
| `ipc_transfer.py` | KV through a shared staging slot for a same-GPU pair (CUDA IPC; /dev/shm on CPU) | reuse a slot before the receiver's ack |
| `prefix_index.py` | the router's shadow of each rank's prefix cache (LRU of block hashes) and the `prefix` routing rule; pure Python | ask a rank what it caches |
| `migration.py` | the router's side of elastic workers beyond placement: mode flips (on the measured work mix) and live migration (when to move which running request, the steps of one move) | move two at once |
| `modes.py` | elastic ranks' modes (mixed, mostly-prefill, mostly-decode): the flip policy with hysteresis and dwell; pure | talk to a rank |
| `placement.py` | elastic workers: a request's (prefill, decode) ranks from a snapshot and the SLOs; pure | talk to a rank |
| `router.py` | rank 0: the `api.backend.Backend` over the workers; routing | block the asyncio loop |
| `router_state.py` | what the router keeps per request and per rank | talk to a rank |
| `frontend.py` | rank 0's entry point: the router, then the HTTP app under uvicorn until stopped | |
| `worker.py` | every other rank's loop over one `Engine`, its role data: prefill (each layer's KV streamed to the decode rank), decode (reserve, land KV, decode), colocated (both) | keep KV past a prompt's last chunk on a prefill rank |
| `lockstep.py` | one plan for a TP instance's ranks: the leader shares each turn's messages (seeded) and checks its followers did not diverge | let a follower act on a message its leader has not shared |
| `local.py` | `LocalWorld`: the router and one colocated worker in one process, in-memory links (the tests' in-process server) | run PD (KV links need ranks) |
| `shutdown.py` | how ranks stop: rank 0's drain on a signal, workers' signal policy, 503 after a failure | stop a worker on its own signal |

The entry point that starts a rank is `pd_local.launch` (kept at the top, beside `__main__`,
because it is what torchrun runs). Imports `engine`, `model`, the shared `config` and
`tokenizer`, and `api` (the router implements `api.backend.Backend` and starts `api.server`'s app
on rank 0); `api` never imports `cluster`. Never imports `cli`.
"""
