"""The torchrun world: ranks -> roles, the wire between them, and the three rank loops.

| module | owns | never does |
|---|---|---|
| `dist.py` | ranks -> roles, every process group, created in one fixed order on every rank | |
| `messages.py` | every typed cross-rank message and its int64 wire codec | pickle |
| `channel.py` | one control link over a 2-rank gloo group: `Sender`, `Receiver` thread -> `Inbox`, `Heartbeater` | poll a gloo receive |
| `transfer.py` | KV + hidden-state sender/receiver, header before payload | |
| `router.py` | rank 0: the `api.backend.Backend` over the workers; routing; starts the HTTP app | block the asyncio loop |
| `prefill.py` | a prefill rank's loop: batch prompts, stream each layer's KV to its decode rank | keep KV |
| `decode.py` | a decode (or colocated) rank's loop: reserve, receive KV, sample, decode | compute a prompt's KV it was sent |

The entry point that starts a rank is `pd_local.launch` (kept at the top, beside `__main__`,
because it is what torchrun runs). Imports `engine`, `model`, the shared `config` and
`tokenizer`, and `api` (the router implements `api.backend.Backend` and starts `api.server`'s app
on rank 0); `api` never imports `cluster`. Never imports `cli`.
"""
