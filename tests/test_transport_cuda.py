"""The parts of the CUDA IPC transport that need no GPU: mapping the producer's device by UUID / PCI bus id, the pool
of persistent buffers (which buffer an export goes to, when one may be reused or must grow), the shared-memory control
block, and the consumer's checks of a reference before it maps anything. The GPU half is tests/test_gpu.py."""

from __future__ import annotations

import logging
import secrets

import pytest
import torch

from minedraft.runtime import transport
from minedraft.runtime.transport import (POOL_MIN_BYTES, BufferPool, TensorExporter, TensorImporter, TransportError,
                                         leftover_segments, resolve_device, sweep_orphans)
from minedraft.v1 import common_pb2

U0 = "5f0c2b1e-1111-2222-3333-444455556666"
U1 = "a1b2c3d4-aaaa-bbbb-cccc-ddddeeeeffff"
LOCAL = [(0, U1, "0000:c3:00.0"), (1, U0, "0000:65:00.0")]  # this process sees the producer's GPU as ordinal 1


# ---- resolve_device -------------------------------------------------------------------------------------------------
def test_resolve_by_uuid_not_ordinal():
    assert resolve_device(U0, "0000:65:00.0", LOCAL) == 1
    assert resolve_device(U1, "", LOCAL) == 0
    assert resolve_device("GPU-" + U0.upper(), "", LOCAL) == 1  # nvidia-smi spelling of torch's uuid


def test_resolve_falls_back_to_pci_only_without_a_uuid():
    assert resolve_device("", "0000:65:00.0", LOCAL) == 1
    assert resolve_device("", "00000000:65:00.0", LOCAL) == 1  # NVML's 8-digit domain
    assert resolve_device("", "65:00.0", LOCAL) == 1
    assert resolve_device(U0, "0000:65:00.0", [(3, "", "0000:65:00.0")]) == 3  # no uuid known here
    # Both sides know uuids and they differ: the same PCI address is another device (a MIG slice of one board).
    with pytest.raises(TransportError, match="not visible"):
        resolve_device(U0, "0000:65:00.0", [(0, U1, "0000:65:00.0")])


def test_resolve_refuses_to_guess():
    with pytest.raises(TransportError, match="refusing to guess"):
        resolve_device("", "", LOCAL)
    with pytest.raises(TransportError, match="not visible"):
        resolve_device("deadbeef-0000-0000-0000-000000000000", "0000:01:00.0", LOCAL)
    with pytest.raises(TransportError, match="not visible"):
        resolve_device(U0, "", [])
    with pytest.raises(TransportError, match="MIG"):
        resolve_device("", "0000:65:00.0", [(0, "", "0000:65:00.0"), (1, "", "0000:65:00.0")])
    with pytest.raises(TransportError, match="listed 2 times"):
        resolve_device(U0, "", [(0, U0, ""), (1, U0, "")])


def test_pci_id_from_device_properties():
    class Props:
        pci_domain_id, pci_bus_id, pci_device_id = 0, 0x65, 0

    assert transport._pci_of(Props()) == "0000:65:00.0"
    assert transport._pci_of(object()) == ""  # an older torch without the attributes


# ---- the buffer pool ------------------------------------------------------------------------------------------------
class FakeMemory:
    def __init__(self):
        self.allocated, self.freed = [], []

    def allocate(self, slot, device, nbytes):
        mem = {"slot": slot, "device": device, "nbytes": nbytes}
        self.allocated.append(mem)
        return mem

    def free(self, mem, was_read):
        self.freed.append((mem, was_read))


def make_pool(slots=4):
    mem, acks = FakeMemory(), {}
    pool = BufferPool(slots, mem.allocate, mem.free)
    return pool, mem, acks, (lambda slot: acks.get(slot, 0))


def test_buffer_reused_only_after_release_and_acknowledged_read():
    pool, mem, acks, acked = make_pool()
    a = pool.acquire(1000, 0, acked)
    assert (a.slot, a.generation, a.capacity, a.busy) == (0, 1, POOL_MIN_BYTES, True)
    b = pool.acquire(1000, 0, acked)  # a is live
    assert b.slot == 1
    pool.release(a, 1)
    c = pool.acquire(1000, 0, acked)  # released, but nobody reported reading it: not reused
    assert c.slot == 2
    acks[0] = 1
    d = pool.acquire(1000, 0, acked)
    assert d is a and d.generation == 4 and len(mem.allocated) == 3
    assert not pool.release(a, 1)  # a stale release (export 1) does not free export 4
    assert a.busy
    assert pool.release(a, 4) and not a.busy


def test_acknowledgement_without_release_does_not_free():
    pool, mem, acks, acked = make_pool()
    a = pool.acquire(10, 0, acked)
    acks[0] = a.generation  # the consumer read it, but the router has not released it (a retry may read it again)
    assert pool.acquire(10, 0, acked).slot == 1


def test_smallest_fitting_buffer_is_chosen_and_growth_doubles():
    pool, mem, acks, acked = make_pool()
    a = pool.acquire(POOL_MIN_BYTES * 4, 0, acked)
    b = pool.acquire(10, 0, acked)
    assert b.capacity == a.capacity  # new buffers are as big as the biggest so far: the pool converges
    for buf in (a, b):
        pool.release(buf, buf.generation)
        acks[buf.slot] = buf.generation
    big = pool.acquire(POOL_MIN_BYTES * 5, 0, acked)  # neither fits: the biggest free one is replaced, doubled
    assert big.slot == 0 and big.capacity == 2 * POOL_MIN_BYTES * 4
    assert mem.freed == [(mem.allocated[0], True)] and pool.replaced == 1
    assert big.first_generation == big.generation
    small = pool.acquire(10, 0, acked)
    assert small.slot == 1  # the other one still fits small requests
    pool.release(big, big.generation)
    # Growth to more than double takes exactly what is needed (rounded).
    acks[0] = big.generation
    huge = pool.acquire(POOL_MIN_BYTES * 100 + 1, 0, acked)
    assert huge.capacity >= POOL_MIN_BYTES * 100 + 1 and huge.capacity % transport.POOL_ALIGN == 0


def test_replaced_never_read_buffer_is_reported_unread():
    pool, mem, acks, acked = make_pool(slots=1)
    a = pool.acquire(10, 0, acked)
    pool.release(a, a.generation)
    pool.acquire(POOL_MIN_BYTES * 3, 0, acked)  # full pool: reclaimed without an ack, and grown
    assert mem.freed == [(mem.allocated[0], False)]  # nobody mapped it: the producer drops torch's ref counter


def test_full_pool_reclaims_the_oldest_released_buffer(caplog):
    pool, mem, acks, acked = make_pool(slots=3)
    bufs = [pool.acquire(10, 0, acked) for _ in range(3)]
    pool.release(bufs[2], bufs[2].generation)
    pool.release(bufs[1], bufs[1].generation)
    with caplog.at_level(logging.WARNING, logger="minedraft.runtime.transport"):
        again = pool.acquire(10, 0, acked)
    assert again is bufs[1] and pool.reclaimed == 1  # released longest ago = lowest generation
    assert "never reported read" in caplog.text
    assert len(pool.buffers) == 3 and len(mem.allocated) == 3
    pool.acquire(10, 0, acked)
    with pytest.raises(RuntimeError, match="live exports"):
        pool.acquire(10, 0, acked)


def test_buffers_are_per_device():
    pool, mem, acks, acked = make_pool(slots=2)
    a = pool.acquire(10, 0, acked)
    pool.release(a, a.generation)
    acks[0] = a.generation
    b = pool.acquire(10, 1, acked)
    assert b.slot == 1 and b.device == 1
    pool.release(b, b.generation)
    c = pool.acquire(10, 2, acked)  # no slot left: a free buffer on another device moves
    assert c.device == 2 and pool.replaced == 1


def test_clear_frees_everything():
    pool, mem, acks, acked = make_pool()
    a, b = pool.acquire(10, 0, acked), pool.acquire(10, 0, acked)
    acks[a.slot] = a.generation
    assert pool.clear(acked) == 2 and not pool.buffers and pool.capacity_bytes == 0
    assert sorted(r for _, r in mem.freed) == [False, True]
    assert not pool.release(a, a.generation)


def test_failed_growth_drops_the_slot():
    pool, mem, acks, acked = make_pool()
    a = pool.acquire(10, 0, acked)
    pool.release(a, a.generation)
    acks[0] = a.generation

    def oom(slot, device, nbytes):
        raise RuntimeError("CUDA out of memory")

    pool._allocate = oom
    with pytest.raises(RuntimeError, match="out of memory"):
        pool.acquire(POOL_MIN_BYTES * 2, 0, acked)
    assert not pool.buffers and len(mem.freed) == 1


# ---- the control block ----------------------------------------------------------------------------------------------
@pytest.fixture
def control():
    creator = secrets.token_hex(6)
    block = transport._ControlBlock.create(transport.segment_name(creator, 1), 8)
    yield creator, block
    block.close()
    assert not leftover_segments(creator)


def test_control_block_is_shared_and_checked(control):
    creator, block = control
    peer = transport._ControlBlock.open(block.name, creator, block.token)
    try:
        block.publish(3, 17)
        assert peer.published(3) == 17 and peer.acked(3) == 0
        peer.ack(3, 17)
        peer.ack(3, 5)  # acknowledgements never go backwards
        assert block.acked(3) == 17 and peer.slots == 8
    finally:
        peer.close()
    assert (transport.SHM_DIR / block.name).exists()  # only the owner unlinks
    with pytest.raises(TransportError, match="capability token"):
        transport._ControlBlock.open(block.name, creator, secrets.token_bytes(16))
    with pytest.raises(TransportError, match="was not made by"):
        transport._ControlBlock.open(block.name, "0" * 12, block.token)
    with pytest.raises(TransportError, match="does not exist"):
        transport._ControlBlock.open(transport.segment_name(creator, 2), creator, block.token)
    assert block.name not in sweep_orphans()  # its creator (us) is alive
    peer = transport._ControlBlock.open(block.name, creator, block.token)
    block.close()  # the producer frees its pool: a consumer's mapping of the (unlinked) block sees every slot retired
    assert peer.published(3) == 0 and peer.acked(3) == 17
    peer.close()


# ---- the consumer's checks before it maps anything ------------------------------------------------------------------
def cuda_ref(creator, block, **over) -> common_pb2.TensorRef:
    ref = common_pb2.TensorRef(dtype="float32", shape=[4, 8])
    c = ref.cuda_ipc
    c.device, c.handle, c.storage_size_bytes = 7, b"h" * 64, 4096
    c.stride.extend([8, 1])
    c.name, c.creator, c.buffer, c.generation = transport.segment_name(creator, 5), creator, f"{creator}-pool2", 9
    c.slot, c.control, c.token = 2, block.name, block.token
    c.ready_event_handle, c.device_uuid = b"e" * 64, U0
    for k, v in over.items():
        if k == "dtype":
            ref.dtype = v
        elif k == "stride":
            c.ClearField("stride")
            c.stride.extend(v)
        else:
            setattr(c, k, v)
    return ref


def test_consumer_refuses_bad_cuda_references_before_mapping(control):
    creator, block = control
    gpu = TensorImporter(torch.device("cuda", 0))  # no CUDA needed: every check below comes first
    ref = cuda_ref(creator, block)
    with pytest.raises(TransportError, match="not introduced"):
        gpu.open(ref)
    gpu.trust(creator)
    cpu = TensorImporter(torch.device("cpu"))
    cpu.trust(creator)
    with pytest.raises(TransportError, match="without a GPU"):
        cpu.open(ref)
    with pytest.raises(TransportError, match="without a pool buffer"):
        gpu.open(cuda_ref(creator, block, buffer=""))
    with pytest.raises(TransportError, match="does not fit"):
        gpu.open(cuda_ref(creator, block, storage_size_bytes=4 * 32 - 1))
    with pytest.raises(TransportError, match="does not fit"):
        gpu.open(cuda_ref(creator, block, tensor_offset=1000))
    with pytest.raises(TransportError, match="negative"):
        gpu.open(cuda_ref(creator, block, stride=[8, -1]))
    with pytest.raises(TransportError, match="differ in length"):
        gpu.open(cuda_ref(creator, block, stride=[1]))
    with pytest.raises(TransportError, match="unknown dtype"):
        gpu.open(cuda_ref(creator, block, dtype="Tensor"))
    with pytest.raises(TransportError, match="capability token"):
        gpu.open(cuda_ref(creator, block, token=secrets.token_bytes(16)))
    with pytest.raises(TransportError, match="outside"):
        gpu.open(cuda_ref(creator, block, slot=8))
    # The genuine control block, but the buffer no longer holds export 9: released and reused.
    block.publish(2, 10)
    with pytest.raises(TransportError, match="no longer holds export 9"):
        gpu.open(ref)
    assert gpu.cached_mappings == 0 and block.acked(2) == 0
    assert gpu.forget(creator) == 0 and not gpu._controls


def test_exporter_without_cuda():
    exporter = TensorExporter(secrets.token_hex(6))
    with pytest.raises(TransportError, match="needs a CUDA tensor"):
        exporter.export(torch.ones(3), "cuda_ipc")
    assert exporter.live == 0 and exporter.pool_stats()["buffers"] == 0
    assert exporter.release_all() == 0
    assert exporter.pool_slots > exporter.max_live


def test_exporter_leases_follow_release_and_max_live(monkeypatch):
    """The exporter's CUDA bookkeeping with fake memory: names are released by the router's lists, max_live evicts
    the oldest, release_all frees the pool and its control block."""
    exporter = TensorExporter(secrets.token_hex(6), max_live=2)
    mem = FakeMemory()
    exporter._control = transport._ControlBlock.create(exporter._next_name(), exporter.pool_slots)
    exporter._pool = BufferPool(exporter.pool_slots, mem.allocate, mem.free)
    names = []
    for _ in range(3):
        buf = exporter._pool.acquire(100, 0, exporter._control.acked)
        exporter._control.publish(buf.slot, buf.generation)
        names.append(exporter._next_name())
        exporter._remember(names[-1], transport._Lease(exporter._pool, buf, buf.generation))
    assert exporter.live == 2  # the first export was evicted (never reported consumed)
    assert exporter.pool_stats()["busy"] == 2
    assert exporter.release([names[1], names[1], "minedraft-nope-1"]) == 1  # duplicates in release lists are fine
    assert exporter.live == 1 and exporter.pool_stats()["busy"] == 1
    assert leftover_segments(exporter.instance_id) == [exporter._control.name]
    assert exporter.release_all() == 1
    assert exporter.live == 0 and exporter._pool is None and len(mem.freed) == 3
    assert not leftover_segments(exporter.instance_id)
