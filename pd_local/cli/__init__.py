"""The `pd-local` sub-commands (see `pd_local.__main__`); each module has `main(argv) -> int`.

| module | command |
|---|---|
| `serve.py` | `pd-local serve`: check the config, then start torchrun with `python -m pd_local.launch` |
| `generate.py` | `pd-local generate`: offline JSONL batch through one in-process engine |
| `weights.py` | `pd-local weights fetch|convert-gguf` |
| `chat.py` | `pd-local chat`: streaming chat against a running server (never imports torch) |

The top layer: may import anything below; nothing imports `cli` except `pd_local.__main__`
(and `cli` modules one another).
"""
