"""Model code: plain nn.Modules with Hugging Face parameter names and no knowledge of ranks,
requests or schedulers.

| module | owns | never does |
|---|---|---|
| `config.py` | `ModelConfig` from a HF `config.json`; refuses unsupported architectures | touch tensors |
| `llama.py` | `LlamaForCausalLM` (Llama, Mistral, Qwen2, Qwen3) | know ranks, requests or schedulers |
| `layers.py` | linear, RMSNorm, rotary embedding | |
| `attention.py` | `AttentionMetadata`; prefill (varlen causal) and paged decode attention, `write_kv` | allocate blocks |
| `kv_cache.py` | `PagedKVCache`: the per-layer K/V tensors attention reads and writes | decide which blocks a sequence gets |
| `weights.py` | load a HF directory (single or sharded safetensors, memory-mapped) into the model | pickle |
| `gguf.py` | GGUF -> HF directory conversion (dequantise, undo llama.cpp's Q/K permutation, tokenizer) | |

The bottom layer: imports nothing from `pd_local` outside `model/`.
"""
