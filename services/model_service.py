"""The part of the drafter and the verifier that is the same: a process that owns one ModelRunner and serves a router
over a bidirectional Session stream, one batch step at a time.

Steps run on a single worker thread (the model is the one resource; running two steps at once would only make both
slower), so the event loop stays free for health checks and new sessions. Every sequence and every exported buffer is
owned by the session that created it and is freed when that session ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from minedraft.config import ModelServiceConfig
from minedraft.runtime.checkpoint import load_model, load_tokenizer, vocab_digest
from minedraft.runtime.kv_cache import CacheFull
from minedraft.runtime.runner import Extend, ModelRunner
from minedraft.runtime.sampling import SamplingParams
from minedraft.runtime.transport import (TensorExporter, TensorImporter, TransportError, host_id, sweep_orphans,
                                         tensor_digest)
from minedraft.v1 import common_pb2, model_service_pb2 as pb

log = logging.getLogger(__name__)


def sampling_from_proto(opts: common_pb2.SamplingOptions) -> SamplingParams:
    params = SamplingParams(temperature=opts.temperature, top_p=opts.top_p or 1.0, top_k=opts.top_k,
                            seed=opts.seed if opts.HasField("seed") else None)
    params.validate()
    return params


def step_error(exc: BaseException) -> common_pb2.StepError:
    """Exceptions from a step become gRPC status codes the router passes on to the client."""
    if isinstance(exc, CacheFull):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif isinstance(exc, TransportError):
        code = grpc.StatusCode.PERMISSION_DENIED
    elif isinstance(exc, (ValueError, KeyError)):
        code = grpc.StatusCode.INVALID_ARGUMENT
    else:
        log.exception("step failed")
        code = grpc.StatusCode.INTERNAL
    return common_pb2.StepError(code=code.value[0], message=str(exc))


class BusyWindow:
    """How much of the last `window_s` seconds went into steps, a step still running included. Steps run on the step
    thread and GetModelInfo asks on the event loop, hence the lock; it is held for microseconds."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._steps: deque[tuple[float, float]] = deque()  # (start, end) of recent steps, oldest first
        self._running_since: float | None = None
        self._lock = threading.Lock()

    def started(self, t: float) -> None:
        with self._lock:
            self._running_since = t

    def ended(self, t: float) -> None:
        with self._lock:
            self._steps.append((self._running_since if self._running_since is not None else t, t))
            self._running_since = None
            while self._steps and self._steps[0][1] < t - self.window_s:
                self._steps.popleft()

    def fraction(self, now: float) -> float:
        since = now - self.window_s
        with self._lock:
            spans = list(self._steps) + ([(self._running_since, now)] if self._running_since is not None else [])
        return sum(max(0.0, end - max(start, since)) for start, end in spans) / self.window_s


class ModelService:
    """Base of DrafterService and VerifierService. A subclass declares its role (name, gRPC service, the request field
    that carries its batch step, its response type, its sampling salt) as class attributes and implements `work`."""

    role = "model"
    generator_salt = 0
    grpc_service = ""  # full name of the gRPC service, e.g. minedraft.v1.Drafter

    def __init__(self, cfg: ModelServiceConfig):
        """Cheap: the server registers us (and answers health checks as NOT_SERVING) before `load` runs."""
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.ready = False
        self.instance_id = secrets.token_hex(6)
        self.exporter = TensorExporter(self.instance_id)
        self.importer = TensorImporter(self.device)
        self.generators: dict[str, torch.Generator | None] = {}
        self.params: dict[str, SamplingParams] = {}
        # seq_id -> the `owned` set of the session holding it. A router that re-dials (a connection it gave up on)
        # re-prefills on its new session while the old one may still be open here: the sequence moves to the new
        # session, and steps of the old one for it are refused (a late write would overwrite the new cache).
        self.owners: dict[str, set[str]] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-step")
        self.busy_s = 0.0
        self.busy_window = BusyWindow()
        self.sessions = 0  # open router sessions; exported buffers are dropped when the last one closes

    def load(self) -> None:
        cfg = self.cfg
        sweep_orphans()
        self.model = load_model(cfg.model, cfg.device, cfg.dtype)
        self.runner = ModelRunner(self.model, cfg.kv_cache_tokens, cfg.block_size, cfg.attention, cfg.cuda_graphs)
        self.tokenizer_digest = vocab_digest(load_tokenizer(cfg.model))
        self.warm_up()
        self.ready = True

    # ---- sequence state -------------------------------------------------------------------------------------------
    def seq_state(self, seq_id: str, start: int, opts: common_pb2.SamplingOptions, owned: set[str]):
        """Sampling params and generator of a sequence. Written from position 0, a sequence begins anew in this
        session (new params and generator, whoever held it before); later steps must come from its session."""
        holder = self.owners.get(seq_id)
        if start == 0:
            if holder is not None and holder is not owned:
                holder.discard(seq_id)  # taken over: the old session's end must not free it
            params = sampling_from_proto(opts)
            self.params[seq_id] = params
            self.generators[seq_id] = params.make_generator(salt=self.generator_salt)
            owned.add(seq_id)
            self.owners[seq_id] = owned
        elif holder is None:
            raise ValueError(f"unknown sequence {seq_id!r} (released, or cached on another replica)")
        elif holder is not owned:
            raise ValueError(f"sequence {seq_id!r} was taken over by a newer session: stale step refused")
        return self.params[seq_id], self.generators[seq_id]

    def release(self, seq_ids, owned: set[str]) -> int:
        n = 0
        for s in seq_ids:
            if s in owned:
                owned.discard(s)
                self.owners.pop(s, None)
                self.params.pop(s, None)
                self.generators.pop(s, None)
                n += self.runner.release(s)
        return n

    def warm_up(self) -> None:
        """One prefill + one decode step, so the first real request does not pay for lazy initialisation."""
        t = time.perf_counter()
        self.runner.step([Extend("__warmup__", 0, [0] * 8)])
        self.runner.step([Extend("__warmup__", 8, [0], all_logits=True)])
        self.runner.release("__warmup__")
        log.info("warm-up took %.0f ms", (time.perf_counter() - t) * 1e3)

    # ---- RPCs shared by both services -----------------------------------------------------------------------------
    async def _require_ready(self, context) -> None:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} is still loading its model")

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        await self._require_ready(context)
        a = self.model.arch
        return pb.ModelInfo(model_name=self.cfg.model.rstrip("/").split("/")[-1], model_type=a.model_type,
                            vocab_size=a.vocab_size, max_context=a.max_position, eos_token_ids=list(a.eos_token_ids),
                            kv_capacity_tokens=self.runner.cache.num_blocks * self.runner.cache.block_size,
                            device=str(self.device), instance_id=self.instance_id, host_id=host_id(),
                            tokenizer_digest=self.tokenizer_digest, block_size=self.runner.cache.block_size,
                            kv_blocks_in_use=self.runner.cache.used_blocks, active_sequences=len(self.params),
                            live_buffers=self.exporter.live, busy_seconds=self.busy_s,
                            busy_fraction=self.busy_window.fraction(time.perf_counter()))

    async def ProbeTransport(self, request: pb.ProbeRequest, context) -> pb.ProbeReply:
        """Negotiation: create a test buffer (producer) or open one and report its digest (consumer). A consumer that
        opens a probe from a creator thereby learns to trust that creator's later buffers."""
        await self._require_ready(context)
        try:
            if request.WhichOneof("action") == "release":
                self.exporter.release([request.release])
                return pb.ProbeReply()
            if request.WhichOneof("action") == "create":
                kind = request.create
                probe = torch.arange(1024, dtype=torch.float32, device=self.device if kind == "cuda_ipc" else "cpu")
                ref = self.exporter.export(probe, kind)
                return pb.ProbeReply(ref=ref, digest=tensor_digest(probe))
            t = self.importer.open(request.open, allow_untrusted=True, consume=False)
            kind = request.open.WhichOneof("payload")
            creator = request.open.shm.creator if kind == "shm" else request.open.cuda_ipc.creator
            if creator:
                self.importer.trust(creator)
            return pb.ProbeReply(digest=tensor_digest(t))
        except Exception as exc:  # a failed probe is an answer, not an error: the router falls back
            return pb.ProbeReply(error=f"{type(exc).__name__}: {exc}")

    async def Session(self, request_iterator, context):
        await self._require_ready(context)
        owned: set[str] = set()
        loop = asyncio.get_running_loop()
        peer = context.peer()
        self.sessions += 1
        log.info("session opened by %s", peer)
        try:
            async for req in request_iterator:
                yield await loop.run_in_executor(self.executor, self._timed_step, req, owned)
        finally:
            # Submitted, not awaited: when the peer dies the RPC is cancelled, and an await here could be cancelled
            # again before the release ran. On the step thread it runs after any step still in flight.
            try:
                self.executor.submit(self._close_session, peer, owned)
            except RuntimeError:  # the executor is shut down: the process is exiting, nothing else runs steps
                self._close_session(peer, owned)

    def _close_session(self, peer: str, owned: set[str]) -> None:
        released = self.release(list(owned), owned)
        self.sessions -= 1
        dropped = self.exporter.release_all() if self.sessions == 0 else 0
        log.info("session from %s closed: released %d sequences, %d buffers; KV blocks in use %d", peer, released,
                 dropped, self.runner.cache.used_blocks)

    def _timed_step(self, req, owned: set[str]):
        t = time.perf_counter()
        self.busy_window.started(t)
        try:
            return self.step(req, owned)
        finally:
            end = time.perf_counter()
            self.busy_s += end - t
            self.busy_window.ended(end)

    work_kind = ""  # "propose" (drafter) or "verify" (verifier): the request field that carries a batch step
    response_cls = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    def step(self, req, owned: set[str]):
        """One session message: a batch step (releases piggybacked on it go first) or a bare release."""
        try:
            kind = req.WhichOneof("kind")
            if kind == "release":
                return self.response_cls(step_id=req.step_id, release=self.release_result(req.release, owned))
            if kind != self.work_kind:
                raise ValueError(f"empty {self.role} request")
            batch = getattr(req, kind)
            self.release_result(batch.release, owned)
            return self.response_cls(step_id=req.step_id, **{kind: self.work(batch, owned)})
        except Exception as exc:
            return self.response_cls(step_id=req.step_id, error=step_error(exc))

    def work(self, batch, owned: set[str]):  # the drafter proposes, the verifier verifies
        raise NotImplementedError

    def release_result(self, rel: pb.Release, owned: set[str]) -> pb.ReleaseResult:
        n = self.release(rel.seq_ids, owned)
        self.exporter.release(rel.buffers)
        return pb.ReleaseResult(released=n, kv_blocks_in_use=self.runner.cache.used_blocks)

    async def shutdown(self) -> None:
        self.exporter.release_all()
        self.executor.shutdown(wait=False, cancel_futures=True)
