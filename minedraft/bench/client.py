"""The load generator: an asyncio gRPC client that replays a workload against the router's public API and records,
per request, when it was sent, when its first token and its last token arrived, and the speculation stats the router
reports with the last message.

Why asyncio (grpc.aio) in one thread: the machine has 2 cores, both taken by the model services, so the client must
cost next to nothing; one event loop holding N streams does. Latency is measured from the moment a request is sent
(after its Poisson arrival time and after a `concurrency` slot frees), as vLLM's serving benchmark does; the time
spent waiting for a slot is recorded separately (queue_s).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import grpc

from minedraft.bench.workload import BenchRequest


@dataclass
class RequestResult:
    index: int
    prompt_tokens: int
    output_len: int  # asked for
    scheduled_s: float  # arrival offset from the workload
    sent_s: float = 0.0  # offsets from the run's start (perf_counter based)
    first_token_s: float | None = None
    end_s: float | None = None
    tokens: int = 0  # received
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    error: str = ""
    token_times: list[float] = field(default_factory=list, repr=False)  # arrival offsets of streamed messages

    @property
    def ok(self) -> bool:
        return not self.error and self.end_s is not None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.sent_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for 1-token outputs."""
        return (self.end_s - self.first_token_s) / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def queue_s(self) -> float:
        return self.sent_s - self.scheduled_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("token_times")
        return d


async def _one(stub, req: BenchRequest, t0: float, sem: asyncio.Semaphore, timeout_s: float, ignore_eos: bool,
               progress) -> RequestResult:
    from minedraft.v1 import generate_pb2 as gpb

    res = RequestResult(req.index, len(req.prompt_ids), req.output_len, req.arrival_s)
    delay = t0 + req.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    async with sem:
        msg = gpb.GenerateRequest(prompt_ids=gpb.TokenIds(ids=req.prompt_ids), max_new_tokens=req.output_len,
                                  ignore_eos=ignore_eos)
        res.sent_s = time.perf_counter() - t0
        try:
            last = None
            async for r in stub.GenerateStream(msg, timeout=timeout_s):
                now = time.perf_counter() - t0
                if r.token_ids:
                    if res.first_token_s is None:
                        res.first_token_s = now
                    res.tokens += len(r.token_ids)
                    res.token_times.append(now)
                last = r
            res.end_s = time.perf_counter() - t0
            if last is not None:
                s = last.speculation
                res.drafted, res.accepted, res.verify_steps = s.drafted_tokens, s.accepted_tokens, s.verify_steps
            if res.first_token_s is None:
                res.error = "no tokens returned"
        except grpc.aio.AioRpcError as exc:
            res.error = f"{exc.code().name}: {exc.details()}"
    if progress is not None:
        progress.update(1)
    return res


async def _run(address: str, requests: list[BenchRequest], concurrency: int, timeout_s: float, ignore_eos: bool,
               desc: str) -> tuple[list[RequestResult], float]:
    from tqdm import tqdm

    from minedraft.v1 import generate_pb2_grpc

    opts = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=opts) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        await ch.channel_ready()
        sem = asyncio.Semaphore(concurrency if concurrency > 0 else max(1, len(requests)))
        with tqdm(total=len(requests), desc=desc, unit="req", leave=False, disable=not desc) as bar:
            t0 = time.perf_counter()
            results = await asyncio.gather(*[_one(stub, r, t0, sem, timeout_s, ignore_eos, bar) for r in requests])
            wall = time.perf_counter() - t0
    return list(results), wall


def run_workload(address: str, requests: list[BenchRequest], concurrency: int = 0, timeout_s: float = 1800.0,
                 ignore_eos: bool = True, desc: str = "") -> tuple[list[RequestResult], float]:
    """Replay `requests` (arrival offsets honoured; at most `concurrency` in flight, 0 = no cap) against the router at
    `address`. Returns the per-request results and the wall time from the start to the last completion."""
    return asyncio.run(_run(address, requests, concurrency, timeout_s, ignore_eos, desc))


def busy_seconds(address: str, kind: str, timeout_s: float = 10.0) -> float:
    """The model service's own count of seconds spent computing steps since it started (GetModelInfo)."""
    from minedraft.v1 import model_service_pb2 as mpb, model_service_pb2_grpc as mgrpc

    with grpc.insecure_channel(address) as ch:
        stub = (mgrpc.DrafterStub if kind == "drafter" else mgrpc.VerifierStub)(ch)
        return stub.GetModelInfo(mpb.ModelInfoRequest(), timeout=timeout_s).busy_seconds
