"""Same-GPU KV pairs: the transport decision (CPU) and CUDA IPC handles (wire format on CPU,
opening them in another process on CUDA)."""

from __future__ import annotations

import pytest
import torch

from pd_local.cluster.ipc import KVTransport, SharedTensor, pack_bytes, pair_transport, unpack_bytes

CPU, G0, G0b, G1 = (torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda:0"),
                    torch.device("cuda", 1))


@pytest.mark.parametrize("p, d, ipc, want", [
    (CPU, CPU, True, KVTransport.GLOO),
    (CPU, CPU, False, KVTransport.GLOO),
    (G0, G1, True, KVTransport.NCCL),
    (G1, G0, False, KVTransport.NCCL),
    (G0, G0b, True, KVTransport.CUDA_IPC),  # share_device: both ranks on cuda:0
    (G1, torch.device("cuda", 1), True, KVTransport.CUDA_IPC),
    (G0, G0, False, KVTransport.GLOO),  # IPC off: through host memory, as before
    (torch.device("cuda"), G0, True, KVTransport.CUDA_IPC),  # no index means device 0
])
def test_pair_transport(p: torch.device, d: torch.device, ipc: bool, want: KVTransport) -> None:
    assert pair_transport(p, d, ipc) is want


def test_pair_transport_refuses_mixed_devices() -> None:
    with pytest.raises(ValueError, match="spans cpu and cuda:0"):
        pair_transport(CPU, G0)


def _fake() -> SharedTensor:
    return SharedTensor(device=0, dtype=torch.bfloat16, size=(4, 2, 3), stride=(6, 3, 1),
                        offset=12, handle=bytes(range(64)), storage_size_bytes=4096,
                        storage_offset_bytes=512, ref_counter_handle=b"/torch_123_456",
                        ref_counter_offset=8, event_handle=b"\x00\xff" * 32,
                        event_sync_required=True)


def test_handle_round_trips_through_an_int64_tensor() -> None:
    h = _fake()
    wire = h.to_wire()
    assert wire.dtype == torch.int64 and wire.dim() == 1
    assert SharedTensor.from_wire(wire) == h


def test_bad_wire_is_refused() -> None:
    wire = _fake().to_wire()
    with pytest.raises(ValueError, match="not a packed CUDA IPC handle"):
        SharedTensor.from_wire(torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="overrun|truncated"):
        SharedTensor.from_wire(wire[:-5])
    with pytest.raises(ValueError, match="2 words too many"):
        SharedTensor.from_wire(torch.cat([wire, torch.zeros(2, dtype=torch.int64)]))
    assert unpack_bytes(pack_bytes(b"abc") + [7], 0) == (b"abc", 4)


def test_export_refuses_cpu_tensors() -> None:
    with pytest.raises(ValueError, match="only CUDA tensors"):
        SharedTensor.export(torch.zeros(3))


def _child_fills(wire: torch.Tensor, event_wire: torch.Tensor, other: torch.Tensor) -> None:
    from pd_local.cluster.ipc import unpack_bytes as ub

    t = SharedTensor.from_wire(wire).open()
    tail = SharedTensor.from_wire(other).open()  # a second view of the same allocation
    assert tail.shape == (8, 8) and torch.equal(tail.cpu(), torch.ones(8, 8))
    ev = torch.cuda.Event.from_ipc_handle(0, ub(event_wire.tolist(), 0)[0])
    torch.cuda.current_stream().wait_event(ev)  # the parent's fill is ordered before ours
    t.add_(torch.arange(t.numel(), device=t.device, dtype=t.dtype).view_as(t))
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_another_process_writes_into_a_shared_tensor() -> None:
    import torch.multiprocessing as mp

    base = torch.full((64, 8), 1.0, device="cuda")
    view = base[8:40]  # a view: offset and shape travel with the handle
    ev = torch.cuda.Event(interprocess=True)
    ev.record()
    proc = mp.get_context("spawn").Process(
        target=_child_fills,
        args=(SharedTensor.export(view).to_wire(), torch.tensor(pack_bytes(ev.ipc_handle())),
              SharedTensor.export(base[56:]).to_wire()))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    want = torch.full((64, 8), 1.0)
    want[8:40] += torch.arange(32 * 8, dtype=torch.float32).view(32, 8)
    assert torch.equal(base.cpu(), want)


@pytest.mark.multiproc
def test_shared_memory_transfer_bit_exact_on_1p2d() -> None:
    """IpcKVSender / IpcKVReceiver over torchrun on CPU (the slot is a /dev/shm file there;
    dist_scripts/check_ipc_transfer.py does the checking on each rank)."""
    from tests.dist_scripts.harness import torchrun

    run = torchrun("check_ipc_transfer.py", 4, ["--prefill", "1", "--decode", "2"], timeout=120)
    assert run.rc == 0, run.output[-4000:]
    for dtype in ("bfloat16", "float32"):
        # one slot per decode rank, and rank 2's grown once (its third batch is larger)
        assert run.lines(f"RESULT rank 1: torch.{dtype}: sent 8 requests, 3 slots announced")
    got = run.lines("RESULT rank 2") + run.lines("RESULT rank 3")
    assert len([x for x in got if "bit-exact" in x]) == 4, run.output[-4000:]
    assert run.lines("RESULT rank 1: no slot files left")
    assert run.leftover == []


def test_config_kv_ipc() -> None:
    from pd_local.config import ConfigError, load_config

    assert load_config(None).kv_ipc is True
    assert load_config(None, {"kv_ipc": False}).kv_ipc is False
    with pytest.raises(ConfigError, match="kv_ipc must be true or false, got 'yes'"):
        load_config(None, {"kv_ipc": "yes"})
