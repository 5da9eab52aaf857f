"""Tests that need a CUDA device (marker `gpu`, excluded by the default suite; skipped where CUDA is unavailable).

    python -m pytest -q -m gpu tests/test_gpu.py

Layout: shared helpers first, then one section per subject, each under a `# ==== ... ====` heading. To add GPU tests,
append a new section at the end; the module-level `pytestmark` already marks and skips them.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import secrets
import time

import pytest
import torch

from minedraft.runtime.transport import (TensorExporter, TensorImporter, TransportError, leftover_segments,
                                         local_cuda_devices, resolve_device)
from minedraft.v1 import common_pb2

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MiB = 1 << 20


# ==== helpers ========================================================================================================
@contextlib.contextmanager
def environ(**values: str | None):
    """Set (or, with None, remove) environment variables for the block: children started inside inherit them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reversed_visible_devices() -> str | None:
    """CUDA_VISIBLE_DEVICES for a child that numbers this process's GPUs the other way round (None with one GPU)."""
    n = torch.cuda.device_count()
    if n < 2:
        return None
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in spec.split(",") if x.strip()][:n] if spec else [str(i) for i in range(n)]
    return ",".join(reversed(ids))


def _sleep_cycles_per_ms() -> float:
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / max(start.elapsed_time(end), 1e-3)


def _producer_main(conn, instance_id: str, max_live: int) -> None:
    """A child process (spawned) that owns a TensorExporter on its cuda:0 and obeys commands from the pipe."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    exporter = TensorExporter(instance_id, max_live=max_live)
    cycles_per_ms = _sleep_cycles_per_ms()
    while True:
        cmd, arg = conn.recv()
        try:
            if cmd == "ping":
                out = {"cycles_per_ms": cycles_per_ms, "uuid": str(torch.cuda.get_device_properties(0).uuid)}
            elif cmd == "export":
                # Everything below is queued on the current stream and export() returns without synchronising: with
                # sleep_ms the GPU is still busy (the fill not done) when the reference reaches the consumer.
                if arg.get("sleep_ms"):
                    torch.cuda._sleep(int(cycles_per_ms * arg["sleep_ms"]))
                t = torch.arange(arg["numel"], dtype=torch.float32, device=dev).add_(arg["base"])
                ref = exporter.export(t, "cuda_ipc")
                pending = not torch.cuda.current_stream(dev).query()
                del t
                out = (ref.SerializeToString(), pending)
            elif cmd == "release":
                out = exporter.release(arg)
            elif cmd == "release_all":
                out = exporter.release_all()
            elif cmd == "collect":
                torch.cuda.synchronize()
                out = torch.cuda.ipc_collect()
            elif cmd == "stats":
                torch.cuda.synchronize()
                out = {"allocated": torch.cuda.memory_allocated(dev), "live": exporter.live,
                       **exporter.pool_stats()}
            elif cmd == "quit":
                exporter.release_all()
                conn.send(("ok", leftover_segments(instance_id)))
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", out))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Producer:
    """Parent-side handle of a producer process."""

    def __init__(self, max_live: int = 16, visible_devices: str | None = None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.instance_id = secrets.token_hex(6)
        env = {"CUDA_VISIBLE_DEVICES": visible_devices} if visible_devices else {}
        with environ(**env):
            self.proc = ctx.Process(target=_producer_main, args=(child, self.instance_id, max_live), daemon=True)
            self.proc.start()
        child.close()
        info = self.call("ping", timeout=180)
        self.cycles_per_ms, self.uuid = info["cycles_per_ms"], info["uuid"]

    def call(self, cmd: str, arg=None, timeout: float = 60):
        self.conn.send((cmd, arg))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"producer did not answer {cmd!r} within {timeout}s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"producer failed {cmd!r}: {value}")
        return value

    def export(self, numel: int, base: float, sleep_ms: float = 0) -> tuple[common_pb2.TensorRef, bool]:
        data, pending = self.call("export", {"numel": numel, "base": base, "sleep_ms": sleep_ms})
        return common_pb2.TensorRef.FromString(data), pending

    def release(self, *refs: common_pb2.TensorRef) -> int:
        return self.call("release", [r.cuda_ipc.name for r in refs])

    def stats(self) -> dict:
        return self.call("stats")

    def close(self) -> list[str]:
        left = []
        if self.proc.is_alive():
            try:
                left = self.call("quit", timeout=30)
            except (TimeoutError, RuntimeError, OSError, EOFError):
                pass
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        return left


@pytest.fixture
def producers():
    made: list[Producer] = []

    def make(**kw) -> Producer:
        made.append(Producer(**kw))
        return made[-1]

    yield make
    for p in made:
        assert p.close() == [], "the producer left shared-memory files behind"


def consumer_for(producer: Producer, device: int = 0) -> TensorImporter:
    imp = TensorImporter(torch.device("cuda", device))
    imp.trust(producer.instance_id)
    return imp


def expected(numel: int, base: float, device) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float32, device=device).add_(base)


# ==== CUDA IPC between two processes (minedraft.runtime.transport) ===================================================
def test_consumer_never_reads_before_the_producers_writes(producers):
    """Stale-read trap: the producer's stream sleeps, then writes this iteration's pattern into a tensor, exports it
    (a copy into the pool buffer that still holds the previous pattern) and answers at once. The consumer must wait
    on the producer's event: every value must be the new pattern."""
    p = producers()
    imp = consumer_for(p)
    numel, sleep_ms, armed = 4 * MiB // 4, 150, 0
    for i in range(8):
        base = 1000.0 * (i + 1)
        ref, pending = p.export(numel, base, sleep_ms=sleep_ms)
        t0 = time.perf_counter()
        out = imp.open(ref)
        waited = time.perf_counter() - t0
        good = out == expected(numel, base, out.device)
        assert bool(good.all()), (f"iteration {i}: {int((~good).sum())} of {numel} values are not this iteration's "
                                  f"(first bad: {out[~good][:4].tolist()})")
        armed += pending and waited > 0.3 * sleep_ms / 1e3
        assert p.release(ref) == 1
    assert armed >= 6, "the producer's GPU was idle before the consumer read: the trap did not test anything"
    stats = p.stats()
    assert stats["buffers"] == 1 and stats["live"] == 0, stats  # one buffer, reused: the hazard really was there


def test_steady_state_keeps_mappings_and_memory_flat(producers):
    """100 steps of export / open / release: the consumer maps the pool once (again when a buffer grows), and
    neither process's allocated memory nor the consumer's cache of mappings grows."""
    p = producers()
    imp = consumer_for(p)
    dev = torch.device("cuda", 0)
    numel = MiB // 4
    samples = {}
    for i in range(100):
        n = numel + (i % 7) * 1000  # sizes vary: the first buffer grows once, then every size fits
        ref, _ = p.export(n, float(i))
        out = imp.open(ref)
        assert torch.equal(out, expected(n, float(i), out.device)), f"iteration {i}"
        del out
        assert p.release(ref) == 1
        if i in (5, 50, 99):
            torch.cuda.synchronize(dev)
            samples[i] = {"consumer_allocated": torch.cuda.memory_allocated(dev), "mappings": imp.cached_mappings,
                          "device_free": torch.cuda.mem_get_info(dev)[0], **p.stats()}
    first, last = samples[5], samples[99]
    for key in ("consumer_allocated", "mappings", "allocated", "buffers", "capacity_bytes"):
        assert first[key] == samples[50][key] == last[key], (key, samples)
    assert last["mappings"] <= 2 and last["buffers"] <= 2 and last["live"] == 0 and last["reclaimed"] == 0, last
    assert last["device_free"] >= first["device_free"] - 64 * MiB, samples
    # What the producer holds is its pool (buffers replaced by growth are freed once the consumer unmapped them).
    # The first buffer (1 MiB) was replaced when it grew; the consumer unmapped it then, so it is freed by now.
    p.call("collect")
    assert p.stats()["allocated"] < last["capacity_bytes"] + MiB // 2, p.stats()


def test_device_is_resolved_by_uuid_not_by_ordinal(producers):
    """With two or more GPUs the producer numbers them the other way round, so its ordinal means another GPU here.
    With one, the ordinal in the reference is simply made wrong. It must open either way, and a GPU that is not
    visible here must fail clearly instead of falling back to the ordinal."""
    n = torch.cuda.device_count()
    p = producers(visible_devices=reversed_visible_devices())
    imp = consumer_for(p)
    ref, _ = p.export(4096, 5.0)
    c = ref.cuda_ipc
    assert c.device == 0 and c.device_uuid, c
    local = resolve_device(c.device_uuid, c.pci_bus_id, local_cuda_devices())
    assert local == (n - 1 if n >= 2 else 0)
    c.device = 7 if n < 8 else 99  # wrong ordinal: ignored
    out = imp.open(ref)
    assert out.device == torch.device("cuda", 0) and torch.equal(out, expected(4096, 5.0, out.device))

    no_uuid = common_pb2.TensorRef()
    no_uuid.CopyFrom(ref)
    no_uuid.cuda_ipc.device_uuid = ""
    if c.pci_bus_id:  # this torch reports PCI ids: they are the fallback
        assert torch.equal(imp.open(no_uuid), out)
    else:
        with pytest.raises(TransportError, match="refusing to guess"):
            imp.open(no_uuid)
    elsewhere = common_pb2.TensorRef()
    elsewhere.CopyFrom(ref)
    elsewhere.cuda_ipc.device_uuid = "GPU-00000000-dead-beef-0000-000000000000"
    elsewhere.cuda_ipc.pci_bus_id = "0000:ff:1f.0"
    with pytest.raises(TransportError, match="not visible"):
        imp.open(elsewhere)
    assert p.release(ref) == 1


def test_reference_to_a_reused_buffer_is_refused(producers):
    """A buffer released before anyone read it is not reused while others are free; once the pool is full it is
    reclaimed, and the old reference then fails instead of returning another export's data."""
    p = producers(max_live=1)  # pool of max_live + 4 = 5 buffers
    imp = consumer_for(p)
    stale, _ = p.export(1024, 1.0)
    p.release(stale)
    refs = []
    for i in range(5):
        ref, _ = p.export(1024, 10.0 + i)
        p.release(ref)
        refs.append(ref)
    assert p.stats()["reclaimed"] == 1 and refs[-1].cuda_ipc.slot == stale.cuda_ipc.slot
    with pytest.raises(TransportError, match="no longer holds export"):
        imp.open(stale)
    assert torch.equal(imp.open(refs[-1]), expected(1024, 14.0, "cuda:0"))


def test_new_pool_after_release_all_replaces_the_consumers_mappings(producers):
    p = producers()
    imp = consumer_for(p)
    a, _ = p.export(2048, 1.0)
    assert torch.equal(imp.open(a), expected(2048, 1.0, "cuda:0"))
    assert imp.cached_mappings == 1
    assert p.call("release_all") == 1
    assert p.stats()["buffers"] == 0 and p.stats()["live"] == 0
    with pytest.raises(TransportError, match="no longer holds"):  # its pool is gone (the block was retired)
        imp.open(a)
    b, _ = p.export(2048, 2.0)
    assert b.cuda_ipc.control != a.cuda_ipc.control
    assert torch.equal(imp.open(b), expected(2048, 2.0, "cuda:0"))
    assert imp.cached_mappings == 1  # the old pool's mapping was dropped, not kept beside the new one
    p.release(b)
    assert imp.forget(p.instance_id) == 1 and imp.cached_mappings == 0


# ==== the runtime on CUDA: oracle against transformers, greedy AR == SD, CUDA graphs == eager, a cluster ==============
# fp32 wherever token identity is asserted: bf16 results depend on each kernel's reduction order (a GEMM of 5 rows
# and one of 1 row may round differently), so a bf16 greedy run may legitimately part ways with another at a
# near-tie; fp32 with TF32 off leaves no such room on these tiny models.

from hf_tiny import FAMILIES, make_checkpoint, make_noisy_copy  # noqa: E402
from minedraft.runtime.checkpoint import load_model  # noqa: E402
from minedraft.runtime.reference import generate, make_sequences  # noqa: E402
from minedraft.runtime.runner import Extend, ModelRunner  # noqa: E402
from minedraft.runtime.sampling import SamplingParams  # noqa: E402

RUNTIME_CONFIGS = [("sdpa", False), ("triton", False), ("triton", True)]  # (attention, cuda_graphs)


def _prompts(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=FAMILIES)
def hf_family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"gpu-{request.param}")
    hf = make_checkpoint(request.param, path)
    draft_path = path / "draft"
    make_noisy_copy(hf, draft_path, noise=0.3)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return request.param, hf.to("cuda"), path, draft_path


@pytest.mark.parametrize("attention,graphs", RUNTIME_CONFIGS)
def test_cuda_logits_match_transformers(hf_family, attention, graphs):
    _, hf, path, _ = hf_family
    runner = ModelRunner(load_model(path, "cuda", "float32"), 4096, block_size=8, attention=attention,
                         cuda_graphs=graphs)
    prompts = _prompts([3, 21, 40, 9])
    ours = runner.step([Extend(f"s{i}", 0, p, all_logits=True) for i, p in enumerate(prompts)])
    with torch.no_grad():
        for p, lg in zip(prompts, ours):
            ref = hf(torch.tensor([p], device="cuda")).logits[0]
            torch.testing.assert_close(lg, ref, atol=2e-4, rtol=2e-4)
    # Decode / verify shaped steps (the graph path when enabled), appended at the end of each prompt.
    extra = _prompts([5, 1, 5, 3], seed=1)
    ours = runner.step([Extend(f"s{i}", len(p), e, all_logits=True) for i, (p, e) in enumerate(zip(prompts, extra))])
    with torch.no_grad():
        for p, e, lg in zip(prompts, extra, ours):
            ref = hf(torch.tensor([p + e], device="cuda")).logits[0, len(p):]
            torch.testing.assert_close(lg, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("attention,graphs", RUNTIME_CONFIGS)
def test_cuda_greedy_ar_and_sd_match_hf_generate(hf_family, attention, graphs):
    _, hf, path, draft_path = hf_family
    opts = dict(attention=attention, cuda_graphs=graphs, block_size=8)
    target = ModelRunner(load_model(path, "cuda", "float32"), 4096, **opts)
    draft = ModelRunner(load_model(draft_path, "cuda", "float32"), 4096, **opts)
    prompts, budgets = _prompts([3, 21, 40, 9]), [24, 5, 30, 12]
    expected = []
    for p, n in zip(prompts, budgets):
        out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=1)
        expected.append(out[0, len(p):].tolist())
    greedy = SamplingParams()
    ar = generate(target, make_sequences(prompts, greedy, budgets, 256, ignore_eos=True))
    assert [s.output for s in ar] == expected
    for k in (1, 4):
        sd = generate(target, make_sequences(prompts, greedy, budgets, 256, ignore_eos=True), draft=draft, k=k)
        assert [s.output for s in sd] == expected, f"k={k}"
        assert 0 < sum(s.accepted for s in sd) < sum(s.drafted for s in sd)
    assert target.cache.used_blocks == 0 and draft.cache.used_blocks == 0


def test_cuda_seeded_sampling_identical_across_runtime_configs(hf_family):
    """Sampled SD on the GPU: same seed, same tokens, whichever attention backend or graph setting runs (fp32)."""
    _, _, path, draft_path = hf_family
    params = [SamplingParams(temperature=0.8, top_p=0.95, top_k=20, seed=s) for s in (1, 2, 3)]
    outs = []
    for attention, graphs in RUNTIME_CONFIGS:
        opts = dict(attention=attention, cuda_graphs=graphs, block_size=8)
        target = ModelRunner(load_model(path, "cuda", "float32"), 4096, **opts)
        draft = ModelRunner(load_model(draft_path, "cuda", "float32"), 4096, **opts)
        seqs = generate(target, make_sequences(_prompts([4, 17, 30]), params, 20, 256, ignore_eos=True), draft=draft,
                        k=3)
        outs.append([s.output for s in seqs])
    assert outs[0] == outs[1] == outs[2]


def test_cuda_graphs_match_eager_in_bf16():
    """bf16 at a Qwen-like head layout: graph replay and the eager Triton path agree closely (not bitwise: padded
    GEMMs may round differently), and both sit close to SDPA."""
    from minedraft.runtime.model import CausalLM, ModelArch

    arch = ModelArch("qwen3", 512, 256, 2, 8, 2, 64, 512, 1e-6, 4096, True, None, True, (1,))
    g = torch.Generator(device="cuda").manual_seed(0)
    w = {"model.embed_tokens.weight": torch.randn(512, 256, device="cuda", generator=g) * 0.05,
         "model.norm.weight": torch.ones(256, device="cuda")}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (512, 256), "self_attn.k_proj": (128, 256), "self_attn.v_proj": (128, 256),
                  "self_attn.o_proj": (256, 512), "mlp.gate_proj": (512, 256), "mlp.up_proj": (512, 256),
                  "mlp.down_proj": (256, 512)}
        for n, s in shapes.items():
            w[p + n + ".weight"] = torch.randn(*s, device="cuda", generator=g) * 0.05
        for n in ("input_layernorm", "post_attention_layernorm"):
            w[p + n + ".weight"] = torch.ones(256, device="cuda")
        w[p + "self_attn.q_norm.weight"] = torch.ones(64, device="cuda")
        w[p + "self_attn.k_norm.weight"] = torch.ones(64, device="cuda")
    inv = 1.0 / (1e6 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    logits = {}
    for attention, graphs in RUNTIME_CONFIGS:
        model = CausalLM(arch, {k: v.to(torch.bfloat16).clone() for k, v in w.items()}, inv, 1.0)
        r = ModelRunner(model, 8192, attention=attention, cuda_graphs=graphs)
        prompts = _prompts([300, 40, 700], vocab=512)
        r.step([Extend(f"s{i}", 0, p) for i, p in enumerate(prompts)])
        steps = _prompts([5, 5, 5], vocab=512, seed=3)
        out = r.step([Extend(f"s{i}", len(p), s, all_logits=True) for i, (p, s) in enumerate(zip(prompts, steps))])
        logits[(attention, graphs)] = torch.cat(out)
    ref = logits[("sdpa", False)]
    for key, lg in logits.items():
        assert (lg - ref).abs().max().item() < 0.05 * ref.abs().max().item(), key
    assert torch.equal(logits[("triton", True)].argmax(-1), logits[("triton", False)].argmax(-1))


def test_cluster_on_cuda_negotiates_cuda_ipc(tmp_path):
    """Router + drafter + verifier on the GPU as `minedraft up --device cuda` runs them: the transport negotiated is
    CUDA IPC, greedy output equals in-process target-only decoding on the GPU, and a seeded sampled request (whose
    draft probabilities travel by CUDA IPC) is reproducible."""
    import grpc

    from minedraft.config import DEMO_DRAFT, DEMO_TARGET
    from minedraft.runtime.checkpoint import load_tokenizer
    from minedraft.v1 import common_pb2, generate_pb2 as gpb, generate_pb2_grpc
    from support import chat, running_cluster

    tok = load_tokenizer(DEMO_TARGET)
    prompts = [chat("Hello, how are you?"), chat("Write a Python function that reverses a string.")]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    target = ModelRunner(load_model(DEMO_TARGET, "cuda", "float32"), 16384)
    want = [s.output for s in generate(target, make_sequences(ids, SamplingParams(), 32, target.arch.max_position,
                                                              target.arch.eos_token_ids))]
    with running_cluster(tmp_path, timeout_s=300, mode="psd", target=DEMO_TARGET, draft=DEMO_DRAFT, device="cuda",
                         drafter_args=["--dtype", "float32"], verifier_args=["--dtype", "float32"],
                         router_args=["--max-batch-size", "4", "--num-speculative-tokens", "3"]) as c:
        stub = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(c.address))
        got = [list(stub.Generate(gpb.GenerateRequest(prompt=p, max_new_tokens=32), timeout=120).token_ids)
               for p in prompts]
        assert got == want
        opts = common_pb2.SamplingOptions(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
        req = gpb.GenerateRequest(prompt=prompts[1], max_new_tokens=24, sampling=opts, ignore_eos=True)
        a, b = stub.Generate(req, timeout=120), stub.Generate(req, timeout=120)
        assert list(a.token_ids) == list(b.token_ids) and len(a.token_ids) == 24
        router_log = (tmp_path / "router.log").read_text()
        assert "(transport cuda_ipc)" in router_log, router_log[-3000:]
