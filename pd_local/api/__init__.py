"""The HTTP front-end: OpenAI-compatible routes over any `Backend`.

| module | owns | never does |
|---|---|---|
| `server.py` | Starlette app (OpenAI routes, health, metrics, the page) | block the event loop |
| `generation.py` | one request's life: outputs -> text, logprobs -> OpenAI objects, SSE or whole | touch a rank |
| `backend.py` | the `Backend` contract the app talks to (the router implements it), `RequestOutput`, `Timeline`, the stats records | know about ranks |
| `openai_request.py` | OpenAI request validation -> `GenerationRequest` (shared with `pd-local generate`) | tokenize twice |
| `logprob_format.py` | logprobs as chat's `content` and completions' parallel lists | compute them |
| `textstream.py` | token ids -> text deltas with stop strings | |
| `metrics.py` | the Prometheus `/metrics` exposition | |
| `cluster.py` | the `/v1/cluster` view: per-rank load, KV blocks, token rates | |
| `static/` | the web page at `/` (HTML, CSS, plain JavaScript) | fetch anything from elsewhere |

Imports `engine` and the shared `tokenizer`; never `cluster` or `cli` (the torchrun backend,
`cluster.router`, plugs in through `Backend`).
"""
