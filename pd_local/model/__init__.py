"""Model code: plain nn.Modules with Hugging Face parameter names and no knowledge of ranks,
requests or schedulers.

| module | owns | never does |
|---|---|---|
| `config.py` | `ModelConfig` from a HF `config.json`; refuses unsupported architectures | touch tensors |
| `llama.py` | `LlamaForCausalLM` (Llama, Mistral, Qwen2, Qwen3) | know ranks, requests or schedulers |
| `layers.py` | linear (and the packed weight copies its kernels read), RMSNorm, rotary embedding | |
| `tp.py` | tensor parallelism from outside the model: `shard` keeps a rank's heads and FFN share, all-reduces after o/down; `check` refuses what does not split | change the model classes |
| `native_linear.py` | the native CPU kernels (`native_linear.c`: the decode-row linear; `native_decode.c`: whole decoder layers; `native_simd.h`): built once per CPU with the C compiler, cached, loaded by ctypes | make a row depend on its batch |
| `native_decode.py` | decode rows through `native_decode.c`, one call per layer; which models it can run | take prompt rows |
| `attention.py` | `AttentionMetadata`; prefill-chunk attention over [cached prefix + chunk] in position-aligned query tiles (one-shot = no prefix), paged decode attention (Triton on CUDA), `write_kv` | allocate blocks |
| `triton_attention.py` | the CUDA paged decode kernel (Triton; imported on CUDA only) | gather K/V into a copy |
| `cuda_graphs.py` | decode CUDA graphs: buckets, static padded inputs, capture and replay | let a padding row touch a block a request owns |
| `dtype.py` | `dtype = "auto"` -> bfloat16 / float32 from the device and the CPU's flags | change once resolved |
| `kv_cache.py` | `PagedKVCache`: the per-layer K/V tensors attention reads and writes | decide which blocks a sequence gets |
| `weights.py` | load a HF directory (single or sharded safetensors, memory-mapped) into the model | pickle |
| `gguf.py` | GGUF -> HF directory conversion (hparams, tensor names, dequantise, undo llama.cpp's Q/K permutation), its verification and manifest | |
| `gguf_reader.py` | open a GGUF (checked complete), read its metadata; `WeightsError` | dequantise |
| `gguf_tokenizer.py` | a GGUF's byte-level BPE -> `tokenizers` BPE + tokenizer_config | add BOS/EOS |

The bottom layer: imports nothing from `pd_local` outside `model/`.
"""
