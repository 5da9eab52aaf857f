"""Moving tensors (draft probabilities) from the drafter to the verifier without pushing them through gRPC.

Three paths, picked per deployment by a probe (see services/router/transport_negotiation): CUDA IPC when both
services share a GPU host, a named POSIX shared-memory segment when they share /dev/shm, inline bytes otherwise.

Handles are capabilities. The producer writes a random token into the segment header and hands it out only in the
reference; the consumer accepts a reference only from a creator it has been introduced to and only if the header token
matches, so a client cannot make a service read memory it was not given. The producer owns every segment it creates
and unlinks it when the consumer is done, when the router session ends, or at shutdown, whichever comes first.
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
_HEADER = 64  # token, creator pid, creator pid-namespace inode, padding (keeps the payload 64-byte aligned)
_NAME_RE = re.compile(r"^minedraft-[0-9a-f]{12}-[0-9]+$")


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(only_pids: set[int] | None = None) -> list[str]:
    """Unlink our segments whose creator died without cleaning up (kill -9), or only those of `only_pids` (dead
    children of a supervisor). Only segments made in our own PID namespace are judged: a pid from another container
    means nothing here."""
    removed, ns = [], _pid_namespace()
    for name in leftover_segments():
        try:
            with open(SHM_DIR / name, "rb") as f:
                header = f.read(_HEADER)
            pid, creator_ns = struct.unpack_from("<QQ", header, TOKEN_BYTES)
            if creator_ns == ns and ns and not _alive(pid) and (only_pids is None or pid in only_pids):
                (SHM_DIR / name).unlink()
                removed.append(name)
        except (OSError, struct.error):
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


class TensorExporter:
    """Producer side (the drafter): turns tensors into TensorRefs and owns what they point at."""

    def __init__(self, instance_id: str, max_live: int = 16):
        self.instance_id = instance_id
        self.max_live = max_live
        self._live: OrderedDict[str, object] = OrderedDict()  # name -> owner (shm path or CUDA tensor)
        self._counter = 0
        self._lock = threading.Lock()

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
            return f"{SHM_PREFIX}{self.instance_id}-{self._counter}"

    def _remember(self, name: str, owner: object) -> None:
        with self._lock:
            self._live[name] = owner
            while len(self._live) > self.max_live:  # a consumer that never reports back must not leak memory
                old, _ = self._live.popitem(last=False)
                log.warning("releasing buffer %s never reported consumed", old)
                self._destroy(old)

    def _export_shm(self, t: torch.Tensor) -> common_pb2.SharedMemoryRef:
        name, token = self._next_name(), secrets.token_bytes(TOKEN_BYTES)
        data = t.cpu().view(torch.uint8).numpy()
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, _HEADER + data.nbytes)
            with mmap.mmap(fd, _HEADER + data.nbytes) as m:
                m[:TOKEN_BYTES] = token
                m[TOKEN_BYTES:TOKEN_BYTES + 16] = struct.pack("<QQ", os.getpid(), _pid_namespace())
                m[_HEADER:] = data.tobytes()
        finally:
            os.close(fd)
        self._remember(name, path)
        return common_pb2.SharedMemoryRef(name=name, offset=_HEADER, nbytes=data.nbytes, token=token,
                                          creator=self.instance_id)

    def _export_cuda(self, t: torch.Tensor) -> common_pb2.CudaIpcRef:
        if not t.is_cuda:
            raise TransportError("cuda_ipc transport needs a CUDA tensor")
        name = self._next_name()
        (device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = t.untyped_storage()._share_cuda_()
        self._remember(name, t)  # keeping the tensor alive keeps the IPC memory valid until release
        return common_pb2.CudaIpcRef(device=device, handle=bytes(handle), storage_size_bytes=size,
                                     storage_offset_bytes=offset, ref_counter_handle=bytes(rc_handle or b""),
                                     ref_counter_offset=rc_offset or 0, event_handle=bytes(ev_handle or b""),
                                     event_sync_required=bool(ev_sync), tensor_offset=t.storage_offset(),
                                     stride=list(t.stride()), name=name, creator=self.instance_id)

    def release(self, names) -> int:
        n = 0
        for name in names:
            with self._lock:
                owned = self._live.pop(name, None) is not None
            if owned:
                self._destroy(name)
                n += 1
        return n

    def release_all(self) -> int:
        with self._lock:
            names = list(self._live)
        return self.release(names)

    @staticmethod
    def _destroy(name: str) -> None:
        try:
            (SHM_DIR / name).unlink()
        except FileNotFoundError:
            pass

    @property
    def live(self) -> int:
        return len(self._live)


class TensorImporter:
    """Consumer side (the verifier): opens TensorRefs from introduced producers only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.trusted_creators: set[str] = set()

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
        """Free a buffer we will never read (its producer died): same checks as reading, then unlink."""
        if ref.WhichOneof("payload") == "shm":
            try:
                self._open_shm(ref, allow_untrusted=False, consume=True)
            except TransportError as exc:
                log.info("discard of %s skipped: %s", ref.shm.name, exc)

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

    def _open_cuda(self, ref: common_pb2.TensorRef, allow_untrusted: bool) -> torch.Tensor:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        c = ref.cuda_ipc
        self._check_creator(c.creator, allow_untrusted)
        if self.device.type != "cuda":
            raise TransportError("cuda_ipc reference sent to a service without a GPU")
        dt = _dtype(ref.dtype)
        # CUDA IPC handles are unforgeable kernel-level capabilities for one allocation; the creator check above
        # restricts which producer we map at all. Rebuild exactly as torch.multiprocessing does (with its cache of
        # already-mapped handles), then copy out so the producer may free its buffer as soon as we answer.
        t = rebuild_cuda_tensor(torch.Tensor, torch.Size(ref.shape), tuple(c.stride), c.tensor_offset,
                                torch.storage.TypedStorage, dt, c.device, c.handle, c.storage_size_bytes,
                                c.storage_offset_bytes, False, c.ref_counter_handle or None, c.ref_counter_offset,
                                c.event_handle or None, c.event_sync_required)
        return t.to(self.device, copy=True)


def leftover_segments(instance_id: str | None = None) -> list[str]:
    """Our segments still present in /dev/shm (tests assert this is empty after shutdown)."""
    prefix = SHM_PREFIX + (f"{instance_id}-" if instance_id else "")
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []
