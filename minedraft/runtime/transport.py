"""Moving tensors (draft probabilities) from the drafter to the verifier without pushing them through gRPC.

Three paths, picked per deployment by a probe (the router's services/router/negotiation.py): CUDA IPC when both
services share a GPU host, a named POSIX shared-memory segment when they share /dev/shm, inline bytes otherwise.

Handles are capabilities. The producer writes a random token into the segment header and hands it out only in the
reference; the consumer accepts a reference only from a creator it has been introduced to and only if the header token
matches, so a client cannot make a service read memory it was not given. The producer owns every segment it creates
and unlinks it when the consumer is done, when the router session ends, or at shutdown, whichever comes first.

CUDA IPC uses a small pool of persistent device buffers per producer instead of sharing a fresh allocation every step
(each of which would cost the consumer an IPC mapping, an opened event and a slot in torch's IPC bookkeeping). An
export copies the tensor into a free pool buffer on the producer's current stream, records the buffer's interprocess
event after the copy and returns at once; the consumer maps each pool buffer once, makes its stream wait on that event
(so it can never read before the producer's writes are done), copies out and synchronises. The device is named by
UUID (or PCI bus id), never by ordinal: the two processes may number their GPUs differently. A shared-memory control
block per pool (same header as the shm segments) holds, per buffer, the generation last published by the producer and
the generation last read by a consumer: the producer reuses a buffer only once the router released its export *and*
a consumer acknowledged reading it, and the consumer checks the published generation before and after its copy, so a
reference to a buffer that was reused meanwhile fails with TransportError instead of returning another step's data.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import re
import secrets
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from minedraft.v1 import common_pb2

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "minedraft-"
TOKEN_BYTES = 16
_HEADER = 64  # capability token, then padding (keeps the payload 64-byte aligned)
# minedraft-<instance id>-<creator>-<n>, where <creator> = <pid>.<process start time>.<pid-namespace inode>: the name
# itself says who made a segment, so a segment whose creator died is recognisable however early in its creation the
# creator was killed (even before it wrote a byte), and a pid reused by another process does not pass for its creator.
_NAME_RE = re.compile(r"^minedraft-[0-9a-f]{12}-([0-9]+)\.([0-9]+)\.([0-9]+)-[0-9]+$")


class TransportError(ValueError):
    """A reference we must not or cannot open; maps to INVALID_ARGUMENT / PERMISSION_DENIED."""


def host_id() -> str:
    """Same value on the same kernel boot: cheap hint that a shm/CUDA IPC probe is worth trying."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return os.uname().nodename


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if there is no such process
    (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # fields after "pid (comm)", the 22nd overall


def creator_tag(pid: int | None = None) -> str:
    """<pid>.<start time>.<pid namespace> of this process (or of `pid`, in our namespace): part of every name we make."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{_start_time(pid) or 0}.{_pid_namespace()}"


def segment_name(instance_id: str, n: int, tag: str | None = None) -> str:
    """The n-th name a producer makes (see _NAME_RE); `tag` defaults to this process's creator_tag()."""
    return f"{SHM_PREFIX}{instance_id}-{tag or creator_tag()}-{n}"


def _creator_dead(name: str) -> tuple[bool, int]:
    """(is the segment's creator known to be dead, its pid). Only creators in our PID namespace can be judged."""
    m = _NAME_RE.match(name)
    if not m:
        return False, 0
    pid, started, ns = (int(x) for x in m.groups())
    if ns != _pid_namespace() or not ns:
        return False, pid
    now = _start_time(pid)
    return (now is None or (started != 0 and now != started)), pid


def sweep_orphans(only_pids: set[int] | None = None) -> list[str]:
    """Unlink our segments whose creator died without cleaning up (kill -9), or only those of `only_pids` (dead
    children of a supervisor). Judged from the segment's name alone, so a half-made segment goes too."""
    removed = []
    for name in leftover_segments():
        dead, pid = _creator_dead(name)
        if dead and (only_pids is None or pid in only_pids):
            try:
                (SHM_DIR / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                continue
    if removed:
        log.warning("removed %d shared-memory segments left by dead processes", len(removed))
    return removed


def tensor_digest(t: torch.Tensor) -> bytes:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).digest()


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise TransportError(f"unknown dtype {name!r}")
    return dt


def _check_size(ref: common_pb2.TensorRef, nbytes: int) -> torch.dtype:
    dt = _dtype(ref.dtype)
    if any(d < 0 for d in ref.shape):
        raise TransportError("negative dimension in tensor shape")
    numel = 1
    for d in ref.shape:
        numel *= d
    if numel * torch.tensor([], dtype=dt).element_size() != nbytes:
        raise TransportError(f"tensor of shape {list(ref.shape)} {ref.dtype} does not match {nbytes} payload bytes")
    return dt


# ---- CUDA devices by identity, not by ordinal -----------------------------------------------------------------------
_PCI_RE = re.compile(r"^(?:([0-9a-f]{1,8}):)?([0-9a-f]{1,2}):([0-9a-f]{1,2})(?:\.([0-7]))?$")


def _norm_uuid(uuid) -> str:
    """'GPU-5f0c…' (nvidia-smi, NVML) and '5f0c…' (torch) are one device; MIG-… uuids are kept as they are."""
    s = str(uuid or "").strip().lower()
    return s[4:] if s.startswith("gpu-") else s


def _norm_pci(bus_id) -> tuple[int, int, int, int] | None:
    """'00000000:65:00.0' (NVML), '0000:65:00.0' (CUDA) and '65:00.0' are one address: (domain, bus, device, fn)."""
    m = _PCI_RE.match(str(bus_id or "").strip().lower())
    if not m:
        return None
    dom, bus, dev, fn = m.groups()
    return int(dom or "0", 16), int(bus, 16), int(dev, 16), int(fn or "0", 16)


def resolve_device(uuid: str, pci_bus_id: str, local_devices: list[tuple[int, str, str]]) -> int:
    """The local ordinal of the producer's GPU, given its UUID and PCI bus id and this process's devices as
    (ordinal, uuid, pci_bus_id). The UUID decides; the PCI bus id is the fallback only where a UUID is unknown on one
    side (it cannot tell MIG slices of one board apart). Never falls back to the producer's ordinal: with different
    CUDA_VISIBLE_DEVICES, or GPUs chosen per service, the same ordinal is another GPU here."""
    u, p = _norm_uuid(uuid), _norm_pci(pci_bus_id)
    if not u and p is None:
        raise TransportError("cuda_ipc reference names no GPU (no uuid, no PCI bus id); refusing to guess by ordinal")
    if u:
        hits = [i for i, lu, _ in local_devices if _norm_uuid(lu) == u]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise TransportError(f"GPU {uuid} is listed {len(hits)} times in this process's devices")
    if p is not None:
        hits = [i for i, lu, lp in local_devices if _norm_pci(lp) == p and not (u and _norm_uuid(lu))]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise TransportError(f"PCI bus id {pci_bus_id} matches {len(hits)} devices here (MIG?); need the uuid")
    raise TransportError(f"the producer's GPU (uuid {uuid or '?'}, PCI {pci_bus_id or '?'}) is not visible to this "
                         f"process (see CUDA_VISIBLE_DEVICES / the container's device list)")


def _pci_of(props) -> str:
    dom, bus, dev = (getattr(props, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    if not all(isinstance(x, int) for x in (dom, bus, dev)):
        return ""
    return f"{dom:04x}:{bus:02x}:{dev:02x}.0"


def cuda_device_identity(index: int) -> tuple[str, str]:
    """(uuid, PCI bus id) of local CUDA device `index`; either may be '' where this torch does not report it."""
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    return (str(uuid) if uuid is not None else ""), _pci_of(props)


def local_cuda_devices() -> list[tuple[int, str, str]]:
    return [(i, *cuda_device_identity(i)) for i in range(torch.cuda.device_count())]


# ---- CUDA IPC pool bookkeeping (no CUDA in here: allocation is a callback, so it is unit-tested on CPU) -----------
POOL_MIN_BYTES = 1 << 16
POOL_ALIGN = 512


def _round_capacity(nbytes: int) -> int:
    return max(POOL_MIN_BYTES, -(-nbytes // POOL_ALIGN) * POOL_ALIGN)


class PoolBuffer:
    """One persistent buffer: a slot number (its stable name), its memory and who may touch it."""

    __slots__ = ("slot", "device", "capacity", "first_generation", "generation", "busy", "memory")

    def __init__(self, slot: int, device: int, capacity: int, generation: int):
        self.slot, self.device, self.capacity = slot, device, capacity
        self.first_generation = generation  # first export from this memory (slots outlive replaced memory)
        self.generation = generation  # the latest export from it
        self.busy = True  # that export is live: not released by the router yet
        self.memory = None

    def __repr__(self) -> str:
        return (f"PoolBuffer(slot={self.slot}, device={self.device}, capacity={self.capacity}, "
                f"generation={self.generation}, busy={self.busy})")


class BufferPool:
    """Which buffer an export goes to. A buffer is reused only when its last export was released (by the router) and
    acknowledged as read (`acked(slot) >= generation`, from the consumer); a free buffer that is too small is replaced
    by one twice as big (or as big as needed). When every slot is taken, the buffer released longest ago is reclaimed
    even without an acknowledgement (a consumer that never reads it must not pin memory forever; one that still tries
    fails the generation check). `allocate(slot, device, nbytes)` makes memory, `free(memory, was_read)` drops it."""

    def __init__(self, slots: int, allocate, free):
        if slots < 1:
            raise ValueError("a buffer pool needs at least one slot")
        self.slots = slots
        self._allocate, self._free = allocate, free
        self.buffers: dict[int, PoolBuffer] = {}
        self.generation = 0
        self.reclaimed = 0  # buffers reused without an acknowledgement
        self.replaced = 0  # buffers replaced by bigger ones (or moved to another device)

    def acquire(self, nbytes: int, device: int, acked) -> PoolBuffer:
        self.generation += 1
        gen = self.generation
        idle = [b for b in self.buffers.values() if not b.busy and b.device == device]
        done = [b for b in idle if acked(b.slot) >= b.generation]
        fits = [b for b in done if b.capacity >= nbytes]
        if fits:
            buf = min(fits, key=lambda b: (b.capacity, b.slot))
        elif done:  # grow the biggest free buffer rather than add one: the pool stays as small as the load needs
            buf = max(done, key=lambda b: (b.capacity, -b.slot))
            self._replace(buf, max(nbytes, 2 * buf.capacity), device, gen, acked)
        elif len(self.buffers) < self.slots:
            slot = min(set(range(self.slots)) - set(self.buffers))
            size = max([nbytes] + [b.capacity for b in self.buffers.values() if b.device == device])
            buf = PoolBuffer(slot, device, _round_capacity(size), gen)
            buf.memory = self._allocate(slot, device, buf.capacity)
            self.buffers[slot] = buf
        else:
            stale = [b for b in self.buffers.values() if not b.busy]
            if not stale:
                raise RuntimeError(f"all {self.slots} CUDA IPC pool buffers hold live exports")
            buf = min(stale, key=lambda b: b.generation)
            self.reclaimed += 1
            log.warning("reusing CUDA IPC buffer %d (export %d) that was released but never reported read",
                        buf.slot, buf.generation)
            if buf.capacity < nbytes or buf.device != device:
                self._replace(buf, max(nbytes, 2 * buf.capacity if buf.device == device else nbytes), device, gen,
                              acked)
        buf.generation, buf.busy = gen, True
        return buf

    def _replace(self, buf: PoolBuffer, nbytes: int, device: int, gen: int, acked) -> None:
        self._free(buf.memory, acked(buf.slot) >= buf.first_generation)
        buf.memory = None
        self.replaced += 1
        try:
            buf.memory = self._allocate(buf.slot, device, _round_capacity(nbytes))
        except BaseException:
            del self.buffers[buf.slot]
            raise
        buf.device, buf.capacity, buf.first_generation = device, _round_capacity(nbytes), gen

    def release(self, buf: PoolBuffer, generation: int) -> bool:
        """The router is done with export `generation`; no-op if the buffer has moved on (reclaimed, pool cleared)."""
        if self.buffers.get(buf.slot) is buf and buf.generation == generation and buf.busy:
            buf.busy = False
            return True
        return False

    def clear(self, acked) -> int:
        n = 0
        for buf in list(self.buffers.values()):
            self._free(buf.memory, acked(buf.slot) >= buf.first_generation)
            buf.memory = None
            n += 1
        self.buffers.clear()
        return n

    @property
    def capacity_bytes(self) -> int:
        return sum(b.capacity for b in self.buffers.values())


class _ControlBlock:
    """Per-pool shared-memory file: the shm segments' header (the capability token), a magic and the slot count, then per slot two little-endian u64: the generation the producer last published in it and the generation
    a consumer last read from it. Each side writes only its own word (aligned 8-byte stores via numpy)."""

    MAGIC = b"MDCUDAP1"

    def __init__(self, name: str, m: mmap.mmap, slots: int, token: bytes, owner: bool):
        import numpy as np

        self.name, self.slots, self.token, self.owner = name, slots, token, owner
        self._mmap = m
        self._words = np.frombuffer(m, dtype="<u8", count=2 * slots, offset=_HEADER)

    @staticmethod
    def size(slots: int) -> int:
        return _HEADER + 16 * slots

    @classmethod
    def create(cls, name: str, slots: int) -> "_ControlBlock":
        token, path = secrets.token_bytes(TOKEN_BYTES), SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, cls.size(slots))
            m = mmap.mmap(fd, cls.size(slots))
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        m[:TOKEN_BYTES] = token
        m[32:40] = cls.MAGIC
        m[40:44] = struct.pack("<I", slots)
        return cls(name, m, slots, token, owner=True)

    @classmethod
    def open(cls, name: str, creator: str, token: bytes) -> "_ControlBlock":
        if not _NAME_RE.match(name) or not name.startswith(f"{SHM_PREFIX}{creator}-"):
            raise TransportError(f"CUDA IPC control block {name!r} was not made by {creator!r}")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR)
        except FileNotFoundError:
            raise TransportError(f"CUDA IPC control block {name} does not exist (pool released?)") from None
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER or (size - _HEADER) % 16 or not 0 < (size - _HEADER) // 16 <= 4096:
                raise TransportError(f"CUDA IPC control block {name} has the wrong size")
            m = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        slots = (size - _HEADER) // 16
        ok = (secrets.compare_digest(m[:TOKEN_BYTES], bytes(token)) and m[32:40] == cls.MAGIC
              and struct.unpack("<I", m[40:44])[0] == slots)
        if not ok:
            m.close()
            raise TransportError(f"capability token does not match CUDA IPC control block {name}")
        return cls(name, m, slots, bytes(token), owner=False)

    def published(self, slot: int) -> int:
        return int(self._words[2 * slot])

    def acked(self, slot: int) -> int:
        return int(self._words[2 * slot + 1])

    def publish(self, slot: int, generation: int) -> None:
        self._words[2 * slot] = generation

    def ack(self, slot: int, generation: int) -> None:
        if int(self._words[2 * slot + 1]) < generation:
            self._words[2 * slot + 1] = generation

    def close(self) -> None:
        if self.owner and self._words is not None:
            # Retire every slot first: a consumer that still has this block mapped (the file is unlinked below, its
            # mapping stays) must refuse references into the freed pool rather than read it.
            self._words[0::2] = 0
        self._words = None
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass
        if self.owner:
            try:
                (SHM_DIR / self.name).unlink()
            except FileNotFoundError:
                pass


class _CudaBuffer:
    """Producer-side memory of one pool buffer: a uint8 tensor shared once with torch's IPC machinery (which keeps
    the memory in its limbo while a consumer still maps it) and the interprocess event recorded after every write."""

    def __init__(self, device: int, nbytes: int):
        with torch.cuda.device(device):
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", device))
            (_, self.handle, self.size, self.offset, self.rc_handle, self.rc_offset, self.ev_handle,
             self.ev_sync) = self.tensor.untyped_storage()._share_cuda_()
            self.event = torch.cuda.Event(interprocess=True)
            self.event.record(torch.cuda.current_stream(device))
            self.event_handle = bytes(self.event.ipc_handle())


class _Lease:
    """What a live CUDA IPC export owns: one generation of one pool buffer."""

    __slots__ = ("pool", "buf", "generation")

    def __init__(self, pool: BufferPool, buf: PoolBuffer, generation: int):
        self.pool, self.buf, self.generation = pool, buf, generation


class TensorExporter:
    """Producer side (the drafter): turns tensors into TensorRefs and owns what they point at."""

    def __init__(self, instance_id: str, max_live: int = 16):
        self.instance_id = instance_id
        self._tag = creator_tag()
        self.max_live = max_live
        self._live: OrderedDict[str, object] = OrderedDict()  # name -> owner (shm path or _Lease of a CUDA buffer)
        self._counter = 0
        self._lock = threading.Lock()
        # CUDA IPC: the pool of persistent buffers, its control block and the identities of our devices.
        self._pool_lock = threading.RLock()
        self._pool: BufferPool | None = None
        self._control: _ControlBlock | None = None
        self._devices: dict[int, tuple[str, str]] = {}
        self._retired_events: list = []  # events of replaced buffers, kept a while: consumers may still hold them

    def export(self, t: torch.Tensor, transport: str) -> common_pb2.TensorRef:
        t = t.contiguous()
        ref = common_pb2.TensorRef(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape))
        if transport == "inline":
            ref.inline_data = t.cpu().view(torch.uint8).numpy().tobytes()
        elif transport == "shm":
            ref.shm.CopyFrom(self._export_shm(t))
        elif transport == "cuda_ipc":
            ref.cuda_ipc.CopyFrom(self._export_cuda(t))
        else:
            raise TransportError(f"unknown transport {transport!r}")
        return ref

    def _next_name(self) -> str:
        with self._lock:
            self._counter += 1
            return segment_name(self.instance_id, self._counter, self._tag)

    def _remember(self, name: str, owner: object) -> None:
        evicted = []
        with self._lock:
            self._live[name] = owner
            while len(self._live) > self.max_live:  # a consumer that never reports back must not leak memory
                evicted.append(self._live.popitem(last=False))
        for old, old_owner in evicted:  # outside the lock: releasing a CUDA buffer takes the pool's lock
            log.warning("releasing buffer %s never reported consumed", old)
            self._destroy(old, old_owner)

    def _export_shm(self, t: torch.Tensor) -> common_pb2.SharedMemoryRef:
        """A new segment: created empty under a name that says who made it (so a crash at any point below leaves
        nothing the sweep cannot judge), sized, header then payload written, then announced."""
        name, token = self._next_name(), secrets.token_bytes(TOKEN_BYTES)
        data = t.cpu().contiguous().view(torch.uint8).numpy()
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, _HEADER + data.nbytes)
            os.pwrite(fd, token, 0)
            if data.nbytes:
                os.pwrite(fd, memoryview(data), _HEADER)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._remember(name, path)
        return common_pb2.SharedMemoryRef(name=name, offset=_HEADER, nbytes=data.nbytes, token=token,
                                          creator=self.instance_id)

    # ---- CUDA IPC ---------------------------------------------------------------------------------------------------
    @property
    def pool_slots(self) -> int:
        return self.max_live + 4  # > max_live: a free (or reclaimable) slot always exists when an export starts

    def _free_cuda_buffer(self, mem: _CudaBuffer | None, was_read: bool) -> None:
        if mem is None:
            return
        # The last copy into it may still run, possibly on another thread's stream: the allocator must not hand the
        # memory out before it is done.
        mem.event.synchronize()
        if not was_read:
            # No consumer mapped it (none acknowledged a read), so none will ever decrement torch's IPC ref counter:
            # do it here, or torch keeps the block in its limbo until the process exits.
            try:
                torch.UntypedStorage._release_ipc_counter_cuda(mem.rc_handle, mem.rc_offset)
            except Exception as exc:  # noqa: BLE001 - best effort, like torch's own
                log.debug("could not drop the IPC ref counter of a pool buffer: %s", exc)
        self._retired_events.append(mem.event)
        del self._retired_events[:-4 * self.pool_slots]
        mem.tensor = None

    def _device_identity(self, index: int) -> tuple[str, str]:
        if index not in self._devices:
            self._devices[index] = cuda_device_identity(index)
        return self._devices[index]

    def _export_cuda(self, t: torch.Tensor) -> common_pb2.CudaIpcRef:
        if not t.is_cuda:
            raise TransportError("cuda_ipc transport needs a CUDA tensor")
        dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
        nbytes = t.numel() * t.element_size()
        uuid, pci = self._device_identity(dev)
        if not uuid and not pci:
            raise TransportError(f"cannot tell which GPU cuda:{dev} is (torch reports no uuid or PCI bus id)")
        name = self._next_name()
        with self._pool_lock:
            if self._pool is None:
                self._control = _ControlBlock.create(self._next_name(), self.pool_slots)
                self._pool = BufferPool(self.pool_slots, lambda slot, d, n: _CudaBuffer(d, n),
                                        self._free_cuda_buffer)
            pool, control = self._pool, self._control
            buf = pool.acquire(nbytes, dev, control.acked)
            gen = buf.generation
            if gen % 256 == 0:  # free replaced buffers that consumers have unmapped since (torch's IPC limbo)
                torch.cuda.ipc_collect()
            # Published before the copy is queued: a consumer still reading an older export from this buffer sees
            # the new generation by the time our write can reach it, and discards what it read.
            control.publish(buf.slot, gen)
            mem = buf.memory
            with torch.cuda.device(dev):
                stream = torch.cuda.current_stream(dev)
                if nbytes:
                    mem.tensor[:nbytes].copy_(t.reshape(-1).view(torch.uint8))
                mem.event.record(stream)  # no host sync: the consumer's stream waits on this event
            ref = common_pb2.CudaIpcRef(
                device=dev, handle=bytes(mem.handle), storage_size_bytes=mem.size, storage_offset_bytes=mem.offset,
                ref_counter_handle=bytes(mem.rc_handle or b""), ref_counter_offset=mem.rc_offset or 0,
                event_handle=bytes(mem.ev_handle or b""), event_sync_required=bool(mem.ev_sync), tensor_offset=0,
                stride=list(t.stride()), name=name, token=control.token, creator=self.instance_id,
                device_uuid=uuid, pci_bus_id=pci, buffer=f"{self.instance_id}-pool{buf.slot}", generation=gen,
                ready_event_handle=mem.event_handle, control=control.name, slot=buf.slot)
        self._remember(name, _Lease(pool, buf, gen))
        return ref

    def pool_stats(self) -> dict:
        with self._pool_lock:
            p = self._pool
            return {"buffers": len(p.buffers) if p else 0, "capacity_bytes": p.capacity_bytes if p else 0,
                    "busy": sum(b.busy for b in p.buffers.values()) if p else 0,
                    "reclaimed": p.reclaimed if p else 0, "replaced": p.replaced if p else 0}

    # ---- release ----------------------------------------------------------------------------------------------------
    def release(self, names) -> int:
        n = 0
        for name in names:
            with self._lock:
                owner = self._live.pop(name, None)
            if owner is not None:
                self._destroy(name, owner)
                n += 1
        return n

    def release_all(self) -> int:
        """Release every export and free the CUDA IPC pool (a consumer's mappings of it are dropped when it sees the
        next pool of ours, or by its LRU; torch keeps mapped memory in its limbo until then)."""
        with self._lock:
            names = list(self._live)
        n = self.release(names)
        with self._pool_lock:
            if self._pool is not None:
                self._pool.clear(self._control.acked)
                self._control.close()
                self._pool = self._control = None
                try:
                    torch.cuda.ipc_collect()
                except Exception as exc:  # noqa: BLE001
                    log.debug("ipc_collect failed: %s", exc)
        return n

    def _destroy(self, name: str, owner: object = None) -> None:
        if isinstance(owner, _Lease):
            with self._pool_lock:
                owner.pool.release(owner.buf, owner.generation)
            return
        try:
            (SHM_DIR / name).unlink()
        except FileNotFoundError:
            pass

    @property
    def live(self) -> int:
        return len(self._live)


def _cuda_layout(ref: common_pb2.TensorRef, dt: torch.dtype) -> int:
    """Check that the tensor a cuda_ipc reference describes lies inside the shared storage; returns its numel."""
    c = ref.cuda_ipc
    if len(c.stride) != len(ref.shape):
        raise TransportError("cuda_ipc stride and shape differ in length")
    if any(d < 0 for d in ref.shape) or any(s < 0 for s in c.stride) or c.tensor_offset < 0:
        raise TransportError("negative dimension, stride or offset in a cuda_ipc reference")
    if c.storage_size_bytes < 0 or c.storage_offset_bytes < 0:
        raise TransportError("negative storage size or offset in a cuda_ipc reference")
    numel = 1
    for d in ref.shape:
        numel *= d
    if numel:
        last = c.tensor_offset + sum((d - 1) * s for d, s in zip(ref.shape, c.stride))
        if (last + 1) * torch.tensor([], dtype=dt).element_size() > c.storage_size_bytes:
            raise TransportError(f"tensor of shape {list(ref.shape)} {ref.dtype} does not fit the "
                                 f"{c.storage_size_bytes}-byte shared buffer")
    return numel


class _Mapping:
    __slots__ = ("ident", "storage", "event", "device")

    def __init__(self, ident, storage, event, device: int):
        self.ident, self.storage, self.event, self.device = ident, storage, event, device


class TensorImporter:
    """Consumer side (the verifier): opens TensorRefs from introduced producers only."""

    def __init__(self, device: torch.device, max_mappings: int = 32):
        self.device = device
        self.trusted_creators: set[str] = set()
        self.max_mappings = max_mappings
        self._lock = threading.RLock()
        self._controls: OrderedDict[str, _ControlBlock] = OrderedDict()  # creator -> its current pool's block
        self._mappings: OrderedDict[tuple[str, str], _Mapping] = OrderedDict()  # (creator, buffer) -> mapping
        self._local_devices: list[tuple[int, str, str]] | None = None

    def trust(self, creator: str) -> None:
        self.trusted_creators.add(creator)

    def open(self, ref: common_pb2.TensorRef, *, allow_untrusted: bool = False, consume: bool = True) -> torch.Tensor:
        """Read a tensor. `consume` unlinks a shm segment once read (draft buffers are read exactly once)."""
        kind = ref.WhichOneof("payload")
        if kind == "inline_data":
            dt = _check_size(ref, len(ref.inline_data))
            t = torch.frombuffer(bytearray(ref.inline_data), dtype=torch.uint8).view(dt).view(*ref.shape)
            return t.to(self.device)
        if kind == "shm":
            return self._open_shm(ref, allow_untrusted, consume).to(self.device)
        if kind == "cuda_ipc":
            return self._open_cuda(ref, allow_untrusted)
        raise TransportError("tensor reference carries no payload")

    def discard(self, ref: common_pb2.TensorRef) -> None:
        """Free a buffer we will never read (its producer died): same checks as reading, then unlink. For CUDA IPC,
        drop our mappings of that producer's pool (they would keep its memory alive)."""
        kind = ref.WhichOneof("payload")
        if kind == "shm":
            try:
                self._open_shm(ref, allow_untrusted=False, consume=True)
            except TransportError as exc:
                log.info("discard of %s skipped: %s", ref.shm.name, exc)
        elif kind == "cuda_ipc" and ref.cuda_ipc.creator in self.trusted_creators:
            self.forget(ref.cuda_ipc.creator)

    def _check_creator(self, creator: str, allow_untrusted: bool) -> None:
        if not allow_untrusted and creator not in self.trusted_creators:
            raise TransportError(f"buffer from {creator!r}, a service this verifier was not introduced to")

    def _open_shm(self, ref: common_pb2.TensorRef, allow_untrusted: bool, consume: bool) -> torch.Tensor:
        s = ref.shm
        self._check_creator(s.creator, allow_untrusted)
        if not _NAME_RE.match(s.name) or not s.name.startswith(f"{SHM_PREFIX}{s.creator}-"):
            raise TransportError(f"shared-memory name {s.name!r} was not made by {s.creator!r}")
        if s.offset != _HEADER or s.nbytes < 0:
            raise TransportError("bad shared-memory offset or size")
        dt = _check_size(ref, s.nbytes)
        try:
            fd = os.open(SHM_DIR / s.name, os.O_RDONLY)
        except FileNotFoundError:
            raise TransportError(f"shared-memory segment {s.name} does not exist (already released?)") from None
        try:
            if os.fstat(fd).st_size != _HEADER + s.nbytes:
                raise TransportError(f"shared-memory segment {s.name} has the wrong size")
            with mmap.mmap(fd, _HEADER + s.nbytes, prot=mmap.PROT_READ) as m:
                if not secrets.compare_digest(m[:TOKEN_BYTES], s.token):
                    raise TransportError(f"capability token does not match segment {s.name}")
                payload = bytearray(m[_HEADER:])
        finally:
            os.close(fd)
        if consume:  # one-shot buffer: unlinking on read leaves nothing behind even if the producer dies now
            try:
                (SHM_DIR / s.name).unlink()
            except FileNotFoundError:
                pass
        return torch.frombuffer(payload, dtype=torch.uint8).view(dt).view(*ref.shape) if payload else \
            torch.empty(*ref.shape, dtype=dt)

    # ---- CUDA IPC ---------------------------------------------------------------------------------------------------
    @property
    def cached_mappings(self) -> int:
        return len(self._mappings)

    def forget(self, creator: str | None = None) -> int:
        """Drop the mappings (and control blocks) of one producer, or of all. Returns how many mappings went."""
        with self._lock:
            keys = [k for k in self._mappings if creator is None or k[0] == creator]
            for k in keys:
                del self._mappings[k]
            for c in [c for c in self._controls if creator is None or c == creator]:
                self._controls.pop(c).close()
            return len(keys)

    def _control(self, c: common_pb2.CudaIpcRef) -> _ControlBlock:
        block = self._controls.get(c.creator)
        if block is not None and block.name == c.control:
            if not secrets.compare_digest(block.token, bytes(c.token)):
                raise TransportError(f"capability token does not match CUDA IPC control block {c.control}")
            self._controls.move_to_end(c.creator)
            return block
        new = _ControlBlock.open(c.control, c.creator, c.token)  # validated before anything of the old one goes
        if block is not None:  # the producer started a new pool: its old buffers are gone or going
            block.close()
            for k in [k for k, m in self._mappings.items() if k[0] == c.creator]:
                del self._mappings[k]
        self._controls[c.creator] = new
        self._controls.move_to_end(c.creator)
        while len(self._controls) > 16:
            gone, old = self._controls.popitem(last=False)
            old.close()
            for k in [k for k in self._mappings if k[0] == gone]:
                del self._mappings[k]
        return new

    def _mapping(self, c: common_pb2.CudaIpcRef, local: int) -> _Mapping:
        key = (c.creator, c.buffer)
        ident = (c.control, bytes(c.handle), c.storage_offset_bytes, c.storage_size_bytes,
                 bytes(c.ready_event_handle), local)
        m = self._mappings.get(key)
        if m is not None and m.ident == ident:
            self._mappings.move_to_end(key)
            return m
        if m is not None:  # the producer replaced this buffer (it grew): unmap the old one so its memory can go
            del self._mappings[key]
        if not c.handle or len(c.ready_event_handle) != 64 or (c.event_sync_required and len(c.event_handle) != 64):
            raise TransportError("malformed CUDA IPC handle in reference")
        try:
            with torch.cuda.device(local):
                storage = torch.UntypedStorage._new_shared_cuda(
                    local, bytes(c.handle), c.storage_size_bytes, c.storage_offset_bytes,
                    bytes(c.ref_counter_handle), c.ref_counter_offset,
                    bytes(c.event_handle) if c.event_sync_required else bytes(64), bool(c.event_sync_required))
                event = torch.cuda.Event.from_ipc_handle(torch.device("cuda", local), bytes(c.ready_event_handle))
        except RuntimeError as exc:  # e.g. the producer is gone, or the driver refuses the handle (see README: GPU)
            raise TransportError(f"cannot map CUDA IPC buffer {c.buffer} on cuda:{local}: {exc}") from exc
        m = self._mappings[key] = _Mapping(ident, storage, event, local)
        while len(self._mappings) > self.max_mappings:
            self._mappings.popitem(last=False)
        return m

    def _open_cuda(self, ref: common_pb2.TensorRef, allow_untrusted: bool) -> torch.Tensor:
        c = ref.cuda_ipc
        self._check_creator(c.creator, allow_untrusted)
        if self.device.type != "cuda":
            raise TransportError("cuda_ipc reference sent to a service without a GPU")
        if not c.buffer or not c.control:
            raise TransportError("cuda_ipc reference without a pool buffer (from an older producer?)")
        dt = _dtype(ref.dtype)
        numel = _cuda_layout(ref, dt)
        with self._lock:
            block = self._control(c)
            if c.slot >= block.slots:
                raise TransportError(f"slot {c.slot} is outside CUDA IPC control block {c.control}")
            if block.published(c.slot) != c.generation:
                raise TransportError(f"CUDA IPC buffer {c.buffer} no longer holds export {c.generation} "
                                     f"(released and reused before it was read)")
            # Resolved outside the device guard below, under which a bare "cuda" would mean the producer's GPU.
            target = self.device if self.device.index is not None else \
                torch.device("cuda", torch.cuda.current_device())
            if numel == 0:
                return torch.empty(tuple(ref.shape), dtype=dt, device=target)
            if self._local_devices is None:
                self._local_devices = local_cuda_devices()
            local = resolve_device(c.device_uuid, c.pci_bus_id, self._local_devices)
            m = self._mapping(c, local)
            with torch.cuda.device(local):
                stream = torch.cuda.current_stream(local)
                m.event.wait(stream)  # the producer's copy into the buffer happens-before our read
                src = torch.empty(0, dtype=dt, device=torch.device("cuda", local))
                src.set_(m.storage, c.tensor_offset, tuple(ref.shape), tuple(c.stride))
                # A cross-device copy runs on the source device's current stream (torch syncs the target's with it).
                out = src.to(target, copy=True)
                done = torch.cuda.Event()
                done.record(stream)
            landed = torch.cuda.Event()
            landed.record(torch.cuda.current_stream(target))
            # Synchronise before the buffer can be released: once we answer, the producer may overwrite it.
            done.synchronize()
            landed.synchronize()
            del src
            if block.published(c.slot) != c.generation:
                raise TransportError(f"CUDA IPC buffer {c.buffer} was overwritten while export {c.generation} "
                                     f"was read")
            block.ack(c.slot, c.generation)
            return out


def leftover_segments(instance_id: str | None = None) -> list[str]:
    """Our segments still present in /dev/shm (tests assert this is empty after shutdown)."""
    prefix = SHM_PREFIX + (f"{instance_id}-" if instance_id else "")
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []
