"""Replicas: two verifiers and two drafters behind one router. Each sequence is pinned to one lane (one verifier,
one drafter); new sequences spread by load, so both verifiers serve; outputs stay equal to target-only decoding; and
when a verifier dies for good, its sequences move to the other lane and finish with the same tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from minedraft.launcher import Cluster
from minedraft.runtime.transport import leftover_segments
from minedraft.v1 import generate_pb2 as gpb, generate_pb2_grpc
from test_e2e import DRAFT, TARGET, chat, model_info
from test_faults import PROMPTS

N = 120


@pytest.fixture()
def cluster(tmp_path):
    c = Cluster(mode="psd", target=TARGET, draft=DRAFT, log_dir=str(tmp_path), verifier_replicas=2,
                drafter_replicas=2, router_args=["--num-speculative-tokens", "3"])
    c.start(timeout_s=180)
    yield c
    c.stop()
    assert not leftover_segments()


def busy(cluster, role):
    port = cluster.port_of(role)
    from minedraft.v1 import model_service_pb2 as mpb, model_service_pb2_grpc as mg

    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = (mg.VerifierStub if role.startswith("verifier") else mg.DrafterStub)(ch)
    return stub.GetModelInfo(mpb.ModelInfoRequest(), timeout=10).busy_seconds


def generate_all(cluster, during=None):
    stub = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    prompts = PROMPTS * 2

    def one(p):
        req = gpb.GenerateRequest(prompt=chat(p), max_new_tokens=N, ignore_eos=True)
        return list(stub.Generate(req, timeout=300).token_ids)

    with ThreadPoolExecutor(len(prompts)) as pool:
        futs = [pool.submit(one, p) for p in prompts]
        if during is not None:
            during()
        return [f.result() for f in futs]


def test_two_lanes_serve_and_agree(cluster):
    info = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address)).GetInfo(gpb.GetInfoRequest())
    assert len(info.verifier_replicas) == 2 and len(info.drafter_replicas) == 2
    before = {r: busy(cluster, r) for r in ("verifier", "verifier-1", "drafter", "drafter-1")}
    out = generate_all(cluster)
    assert out[:3] == out[3:]  # same prompts, (likely) different lanes, same tokens
    for role, b in before.items():
        assert busy(cluster, role) > b + 0.05, f"{role} served nothing"


def test_verifier_replica_lost_for_good(cluster):
    import time

    clean = generate_all(cluster)

    def kill_one():
        time.sleep(1.0)
        cluster.kill("verifier-1")

    assert generate_all(cluster, during=kill_one) == clean
    deadline = time.monotonic() + 10
    while model_info(cluster, "verifier").kv_blocks_in_use and time.monotonic() < deadline:
        time.sleep(0.2)
    assert model_info(cluster, "verifier").kv_blocks_in_use == 0
