"""Replicas: two verifiers and two drafters behind one router. Each sequence is pinned to one lane (one verifier,
one drafter); new sequences spread by load, so both verifiers serve; outputs stay equal to target-only decoding; and
when a verifier dies for good, its sequences move to the other lane and finish with the same tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from minedraft.v1 import generate_pb2 as gpb, generate_pb2_grpc
from support import FAULT_PROMPTS as PROMPTS, chat, model_info

CLUSTER = dict(mode="psd", clean_exit=False, verifier_replicas=2, drafter_replicas=2,
               router_args=["--num-speculative-tokens", "3"])
N = 120


def busy(cluster, role):
    return model_info(cluster, role).busy_seconds


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


def test_two_lanes_serve_and_agree(fresh_cluster):
    cluster = fresh_cluster
    info = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address)).GetInfo(gpb.GetInfoRequest())
    assert len(info.verifier_replicas) == 2 and len(info.drafter_replicas) == 2
    before = {r: busy(cluster, r) for r in ("verifier", "verifier-1", "drafter", "drafter-1")}
    out = generate_all(cluster)
    assert out[:3] == out[3:]  # same prompts, (likely) different lanes, same tokens
    for role, b in before.items():
        assert busy(cluster, role) > b + 0.05, f"{role} served nothing"


def test_verifier_replica_lost_for_good(fresh_cluster):
    cluster = fresh_cluster
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
