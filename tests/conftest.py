"""Fixtures every test module may use. A module that needs a running cluster declares it and asks for a fixture:

    CLUSTER = dict(mode="psd", router_args=[...])       # one cluster for the module: the `cluster` fixture
    CLUSTERS = [dict(mode="psd"), dict(mode="sd"), ...]  # the module's tests run once per cluster (by mode)

`fresh_cluster` starts one per test (for tests that kill processes). The keys are Cluster's fields plus
`clean_exit` (tests/support.py: running_cluster)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from support import BUDGETS, PROMPTS, TARGET, chat, running_cluster, target_only  # noqa: E402

# The test models are tiny: intra-op threads buy nothing, and on a 2-core machine where the services under test (or
# anything else) keep a core busy, two spinning torch threads make every op ~100x slower.
torch.set_num_threads(1)


def pytest_generate_tests(metafunc):
    specs = getattr(metafunc.module, "CLUSTERS", None)
    if specs and "cluster" in metafunc.fixturenames:
        metafunc.parametrize("cluster", specs, indirect=True, scope="module", ids=[s["mode"] for s in specs])


def _spec(request) -> dict:
    return dict(getattr(request, "param", None) or getattr(request.module, "CLUSTER", {}))


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    spec = _spec(request)
    with running_cluster(tmp_path_factory.mktemp(f"logs-{spec.get('mode', 'psd')}"), **spec) as c:
        yield c


@pytest.fixture
def fresh_cluster(request, tmp_path):
    with running_cluster(tmp_path, **_spec(request)) as c:
        yield c


@pytest.fixture(scope="session")
def tokenizer():
    from minedraft.runtime.checkpoint import load_tokenizer

    return load_tokenizer(TARGET)


@pytest.fixture(scope="session")
def prompt_ids(tokenizer):
    return [tokenizer.encode(chat(p), add_special_tokens=False) for p in PROMPTS]


@pytest.fixture(scope="session")
def expected():
    """Target-only greedy continuations of PROMPTS within BUDGETS, computed in this process (EOS honoured, as the
    server does): what every mode must return."""
    return target_only(PROMPTS, BUDGETS)
