"""Faults of a model service must not lose or corrupt a request: the router holds every prompt and accepted token.

A drafter killed mid-generation (SIGKILL, so it cannot clean up): requests go on target-only, speculation resumes
when a drafter is back. A verifier killed mid-generation: requests wait for it and are re-prefilled. Either way the
greedy output equals the fault-free output, nothing is duplicated, and no KV block or shm segment is left.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from minedraft.v1 import common_pb2, generate_pb2 as gpb, generate_pb2_grpc
from support import FAULT_PROMPTS as PROMPTS, chat, wait_kv_free

CLUSTER = dict(mode="psd", clean_exit=False, router_args=["--num-speculative-tokens", "3", "--transport", "shm"])
N = 160


def run_all(cluster, sampled=False, during=None):
    """Stream every prompt concurrently; call `during()` once the first tokens have arrived."""
    stub = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    started = threading.Event()
    opts = common_pb2.SamplingOptions(temperature=0.8, seed=5) if sampled else common_pb2.SamplingOptions()

    def one(p):
        req = gpb.GenerateRequest(prompt=chat(p), max_new_tokens=N, ignore_eos=True, sampling=opts)
        toks = []
        for m in stub.GenerateStream(req, timeout=300):
            toks.extend(m.token_ids)
            started.set()
        return toks

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futs = [pool.submit(one, p) for p in PROMPTS]
        if during is not None:
            started.wait(60)
            time.sleep(0.3)
            during()
        return [f.result() for f in futs]


def test_drafter_killed_midway(fresh_cluster):
    cluster = fresh_cluster
    clean = run_all(cluster)
    faulty = run_all(cluster, during=lambda: cluster.kill("drafter"))
    assert faulty == clean and all(len(t) == N for t in faulty)
    cluster.restart("drafter")  # ... and speculation comes back
    time.sleep(1.5)
    again = run_all(cluster)
    assert again == clean
    wait_kv_free(cluster)


def test_verifier_killed_and_restarted(fresh_cluster):
    cluster = fresh_cluster
    clean = run_all(cluster)

    def kill_and_restart():
        cluster.kill("verifier")
        cluster.restart("verifier")

    faulty = run_all(cluster, during=kill_and_restart)
    assert faulty == clean and all(len(t) == N for t in faulty)
    wait_kv_free(cluster)


def test_verifier_back_while_the_drafter_hangs(fresh_cluster):
    """The verifier is restarted while the drafter is frozen (SIGSTOP: its connection stays open and nothing answers,
    as on a black-holed link) and idle, so no step of its own finds that out. The transport negotiation that follows
    the verifier's return must then lose the drafter (target-only), not the requests; speculation resumes once the
    drafter answers again. (Seen in CI's netns stage: a black-holed drafter failed every stream this way.)"""
    cluster = fresh_cluster
    clean = run_all(cluster)
    drafter = cluster.procs["drafter"]

    def fault():
        cluster.kill("verifier")
        time.sleep(0.3)  # the drafter's step of this tick is answered: it is idle when it freezes
        drafter.send_signal(signal.SIGSTOP)
        try:
            cluster.restart("verifier")
            time.sleep(12.0)  # past the probe's 10 s deadline
        finally:
            drafter.send_signal(signal.SIGCONT)

    faulty = run_all(cluster, during=fault)
    assert faulty == clean and all(len(t) == N for t in faulty)
    router_log = Path(cluster.log_dir) / "router.log"
    deadline = time.monotonic() + 30
    while "speculation resumes" not in router_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "speculation resumes" in router_log.read_text(), "speculation did not come back"
    assert run_all(cluster) == clean
    wait_kv_free(cluster)


def test_sampled_requests_survive_drafter_loss(fresh_cluster):
    cluster = fresh_cluster
    out = run_all(cluster, sampled=True, during=lambda: cluster.kill("drafter"))
    assert all(len(t) == N for t in out)
