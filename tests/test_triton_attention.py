"""The Triton paged decode kernel equals the torch path, run on CPU by Triton's interpreter.

TRITON_INTERPRET=1 must be set when triton is first imported, when the kernel is decorated and
while it runs; so on a CPU machine this module imports a private copy of
pd_local.model.triton_attention with it set (the real module is never left interpreted), and a
fixture sets it around each interpreter test. The interpreter has no bf16: those tests are
fp32. On a CUDA machine they are skipped and the `gpu` tests compare the compiled kernel, in
fp32 and bf16.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton not installed (the test extra installs it on Linux)", allow_module_level=True)

# The interpreter must own this process's first `import triton` (it reads the variable then,
# and at decoration and launch). On a CUDA machine the compiled kernel is what matters and is
# tested below, so the interpreter tests are skipped there rather than switch triton's mode
# under the gpu tests.
HAS_CUDA = torch.cuda.is_available()
interp_only = pytest.mark.skipif(HAS_CUDA, reason="CUDA present: the compiled kernel is tested "
                                 "(gpu tests); the interpreter would take over triton here")
interp = None
if not HAS_CUDA and "triton" not in sys.modules:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:  # a private copy of the module: the real one is never left in interpreted mode
        _spec = importlib.util.spec_from_file_location(
            "_triton_attention_interpreted",
            Path(__file__).parent.parent / "pd_local" / "model" / "triton_attention.py")
        interp = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(interp)
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved
elif not HAS_CUDA:
    interp_only = pytest.mark.skip(reason="triton was imported before this module without "
                                   "TRITON_INTERPRET=1; run this file alone")

from pd_local.model.attention import AttentionMetadata, paged_decode_attention  # noqa: E402


@pytest.fixture(autouse=True)
def _interpret(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_case(ctx: list[int], block_size: int, heads: int, kv_heads: int, dim: int,
              dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q and caches; each row's blocks are scattered over the cache in shuffled order,
    with spare blocks between them, so a kernel that assumed contiguous tables would fail."""
    g = torch.Generator().manual_seed(seed)
    need = sum((n + block_size - 1) // block_size for n in ctx)
    num_blocks = 2 * need + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, i = [], 0
    for n in ctx:
        k = (n + block_size - 1) // block_size
        tables.append(perm[i:i + k])
        i += k + 1  # skip one: blocks of different rows are not adjacent in the permutation
    shape = (num_blocks, block_size, kv_heads, dim)
    kc = torch.randn(shape, generator=g).to(dtype).to(device)
    vc = torch.randn(shape, generator=g).to(dtype).to(device)
    q = torch.randn(len(ctx), heads, dim, generator=g).to(dtype).to(device)
    meta = AttentionMetadata.decode(tables, ctx, [0] * len(ctx), block_size, device)
    return q, kc, vc, meta


CASES = [
    # (context lengths, block_size, heads, kv_heads, head_dim, tile)
    pytest.param([1, 17, 40, 5, 16], 16, 9, 3, 64, 64, id="smollm2-gqa3"),
    pytest.param([33, 2, 100], 16, 8, 2, 64, 16, id="gqa4-tile-eq-block"),
    pytest.param([7, 50, 129], 4, 4, 4, 32, 32, id="mha-block4-tile-spans-blocks"),
    pytest.param([70, 3], 64, 8, 1, 64, 16, id="mqa-tile-smaller-than-block"),
    pytest.param([31, 9], 8, 6, 2, 80, 64, id="head-dim-80-padded"),
]


@interp_only
@pytest.mark.parametrize("ctx, block_size, heads, kv_heads, dim, tile", CASES)
def test_triton_kernel_equals_torch_reference(ctx: list[int], block_size: int, heads: int,
                                              kv_heads: int, dim: int, tile: int) -> None:
    q, kc, vc, meta = make_case(ctx, block_size, heads, kv_heads, dim)
    scale = dim**-0.5
    want = paged_decode_attention(q, kc, vc, meta, scale)
    got = interp.paged_decode_attention_triton(q, kc, vc, meta.block_tables, meta.context_lens,
                                               scale, tile=tile)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@interp_only
def test_triton_rows_do_not_depend_on_the_batch() -> None:
    """Bit-identical rows alone and in a batch (batch invariance), and table entries past a
    row's context are never read (they point at an out-of-range block here)."""
    q, kc, vc, meta = make_case([5, 37, 19], 16, 9, 3, 64, seed=3)
    tables = meta.block_tables.clone()
    tables[0, 1:] = 10**6  # past row 0's context (5 tokens, 1 block): must not be read
    both = interp.paged_decode_attention_triton(q, kc, vc, tables, meta.context_lens, 0.125)
    for row in range(3):
        alone = interp.paged_decode_attention_triton(
            q[row:row + 1], kc, vc, tables[row:row + 1], meta.context_lens[row:row + 1], 0.125)
        assert torch.equal(alone[0], both[row])


@interp_only
def test_triton_reads_q_as_a_view_into_the_fused_rope_output() -> None:
    """The model passes q as the first H heads of its rope'd [T, H + KV, D] q|k tensor (a
    strided view, not a contiguous tensor): the kernel and the torch path give what they give
    for a contiguous copy, bit for bit."""
    q, kc, vc, meta = make_case([1, 17, 40, 5, 16], 16, 9, 3, 64, seed=5)
    qk = torch.cat([q, torch.randn(5, 3, 64)], dim=1)  # [B, H + KV, D]
    view = qk.split([9, 3], dim=1)[0]
    assert not view.is_contiguous() and torch.equal(view, q)
    want = interp.paged_decode_attention_triton(q, kc, vc, meta.block_tables, meta.context_lens, 0.125)
    got = interp.paged_decode_attention_triton(view, kc, vc, meta.block_tables, meta.context_lens, 0.125)
    assert torch.equal(got, want)
    assert torch.equal(paged_decode_attention(view, kc, vc, meta, 0.125),
                       paged_decode_attention(q, kc, vc, meta, 0.125))


@interp_only
def test_triton_refuses_mismatched_shapes() -> None:
    q, kc, vc, meta = make_case([3], 16, 9, 3, 64)
    with pytest.raises(ValueError, match="H must be a multiple of KV"):
        interp.paged_decode_attention_triton(q[:, :8], kc, vc, meta.block_tables,
                                             meta.context_lens, 0.125)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compiled_kernel_on_cuda_equals_torch_reference(dtype: torch.dtype, tol: float) -> None:
    from pd_local.model import attention
    from pd_local.model.triton_attention import paged_decode_attention_triton

    q, kc, vc, meta = make_case([1, 17, 40, 5, 300, 16], 16, 9, 3, 64, dtype, "cuda")
    cpu_meta = AttentionMetadata.decode(meta.block_tables.tolist(), meta.context_lens.tolist(),
                                        [0] * 6, 16)
    # the torch path on CPU tensors is the reference (on CUDA attention dispatches to Triton)
    want = attention.paged_decode_attention(q.cpu().float(), kc.cpu().float(), vc.cpu().float(),
                                            cpu_meta, 0.125)
    got = paged_decode_attention_triton(q, kc, vc, meta.block_tables, meta.context_lens, 0.125)
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)


@interp_only
def test_triton_reads_the_cuda_graph_static_inputs() -> None:
    """The metadata a captured graph reads (views into one flat int64 buffer, padded rows on a
    sink block, tables wider than any row needs) gives the kernel the torch path's result."""
    from pd_local.model.cuda_graphs import DecodeBatch, StaticDecodeInputs

    q, kc, vc, meta = make_case([5, 37, 19], 16, 9, 3, 64, seed=4)
    sink = kc.shape[0] - 1  # attention only reads the sink (the padded row, 1 token)
    static = StaticDecodeInputs(rows=8, width=6, sink_block=sink, block_size=16,
                                device=torch.device("cpu"))
    tables = [row[:(n + 15) // 16] for row, n in zip(meta.block_tables.tolist(), [5, 37, 19])]
    static.fill(DecodeBatch([1, 2, 3], [4, 36, 18], [0, 0, 0], tables, [5, 37, 19]), 4)
    smeta = static.meta(4)
    q4 = torch.cat([q, q[:1]])  # a padded fourth row
    want = paged_decode_attention(q4, kc, vc, smeta, 0.125)  # no groups: one full-width group
    got = interp.paged_decode_attention_triton(q4, kc, vc, smeta.block_tables, smeta.context_lens,
                                               0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
