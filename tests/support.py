"""What the end-to-end tests share, besides fixtures (those are in conftest.py): the models under test, the prompts,
a local cluster that is checked when it stops, and helpers that look into the model services.

Not a test module: test modules import this, never each other.
"""

from __future__ import annotations

import contextlib
import os
import time

from minedraft.config import DEMO_DRAFT, DEMO_TARGET
from minedraft.demo.data import render_chat as chat  # noqa: F401 - the demo pair's chat format, for every test
from minedraft.launcher import Cluster
from minedraft.runtime.transport import leftover_segments
from minedraft.v1 import model_service_pb2 as mpb, model_service_pb2_grpc

TARGET = os.environ.get("MINEDRAFT_TEST_TARGET", DEMO_TARGET)
DRAFT = os.environ.get("MINEDRAFT_TEST_DRAFT", DEMO_DRAFT)

PROMPTS = [
    "Hello, how are you?",
    "Write a Python function that reverses a string.",
    "Explain the difference between a list and a tuple, with examples, and say when to use which one in practice.",
    "What is the capital of France?",
    "hi",
    "Summarise the plot of a detective story in three sentences.",
]
BUDGETS = [40, 17, 33, 8, 25, 50]  # max_new_tokens per prompt above
FAULT_PROMPTS = ["Tell me about the ocean.", "Write a short story about a robot.", "How do plants grow?"]


def target_only(prompts: list[str], budgets: int | list[int], model: str = TARGET, ignore_eos: bool = False
                ) -> list[list[int]]:
    """Greedy target-only continuations of the chat-rendered `prompts`, computed in this process by our reference
    runtime (held to transformers by test_model_oracle.py): what every serving path must return."""
    from minedraft.runtime.checkpoint import load_model, load_tokenizer
    from minedraft.runtime.reference import generate, make_sequences
    from minedraft.runtime.runner import ModelRunner
    from minedraft.runtime.sampling import SamplingParams

    tok = load_tokenizer(model)
    ids = [tok.encode(chat(p), add_special_tokens=False) for p in prompts]
    target = load_model(model)
    seqs = make_sequences(ids, SamplingParams(), budgets, target.arch.max_position, target.arch.eos_token_ids,
                          ignore_eos=ignore_eos)
    return [s.output for s in generate(ModelRunner(target, 16384), seqs)]


@contextlib.contextmanager
def running_cluster(log_dir, clean_exit: bool = True, timeout_s: float = 180, **kwargs):
    """A Cluster on the models under test; on exit it is stopped and nothing may be left behind: with `clean_exit`
    every process exits 0, and no shared-memory segment of ours remains."""
    kwargs.setdefault("target", TARGET)
    kwargs.setdefault("draft", DRAFT)
    c = Cluster(log_dir=str(log_dir), **kwargs)
    c.start(timeout_s=timeout_s)
    try:
        yield c
    finally:
        codes = c.stop()
    if clean_exit:
        assert all(code == 0 for code in codes.values()), f"unclean exit {codes}; logs in {log_dir}"
    assert not leftover_segments(), f"shared-memory segments left behind: {leftover_segments()}"


def model_info(cluster: Cluster, role: str) -> mpb.ModelInfo:
    """A model service's ModelInfo, asked over the cluster's own channel to it (its TLS, if any). `cluster` is a
    Cluster or a tests/netns.py NetnsCluster: both have `channel(role)` and `mode`."""
    ch = cluster.channel(role)
    try:
        stub = (model_service_pb2_grpc.DrafterStub if role.startswith("drafter") else
                model_service_pb2_grpc.VerifierStub)(ch)
        return stub.GetModelInfo(mpb.ModelInfoRequest(), timeout=10)
    finally:
        ch.close()


def wait_kv_free(cluster: Cluster, timeout_s: float = 10.0) -> None:
    """Every KV block, sequence and exported buffer is free again on both model services (on a Cluster or a
    NetnsCluster)."""
    roles = ["verifier"] + ([] if cluster.mode == "ar" else ["drafter"])
    deadline = time.monotonic() + timeout_s
    while True:
        infos = {r: model_info(cluster, r) for r in roles}
        if all(i.kv_blocks_in_use == 0 and i.active_sequences == 0 and i.live_buffers == 0 for i in infos.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"KV not released: {infos}")
        time.sleep(0.2)
