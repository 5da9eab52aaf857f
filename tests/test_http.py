"""The OpenAI-compatible HTTP API and /metrics, against a real cluster, with the official `openai` client and with curl.

Greedy output through /v1/completions must equal gRPC Generate's for the same prompt ids (and so target-only
decoding); chat completions must render the target's chat template exactly as the demo format; streams are SSE with
multi-token deltas; a client that goes away frees its KV; errors are OpenAI's JSON shape with the right status; and
the counters /metrics exposes agree with what the responses said. The in-process tests at the end drive the ASGI app
without a cluster (status mapping, chat template missing).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import openai
import pytest

from minedraft.config import REPO_ROOT
from minedraft.v1 import generate_pb2 as gpb, generate_pb2_grpc
from support import BUDGETS, PROMPTS, TARGET, chat, running_cluster, wait_kv_free

CLUSTER = dict(mode="psd", http_port=0, router_args=["--max-batch-size", "4", "--num-speculative-tokens", "3"])
MODEL = Path(TARGET).name


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def grpc_stub(cluster):
    return generate_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))


def scrape(cluster) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    text = subprocess.run(["curl", "-sS", cluster.http_url + "/metrics"], capture_output=True, text=True,
                          check=True, timeout=30).stdout
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def total(metrics: dict[str, float], name: str, **labels) -> float:
    """Sum of a metric's series whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items() if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


# ---- against the cluster ---------------------------------------------------------------------------------------------
def test_completions_greedy_equal_grpc_generate(cluster, client, prompt_ids, expected):
    """The same prompt ids through both APIs, all at once (so they share batches): identical tokens and text, and
    both equal to target-only decoding."""
    stub = grpc_stub(cluster)

    def both(i):
        http = client.completions.create(model=MODEL, prompt=prompt_ids[i], max_tokens=BUDGETS[i], temperature=0,
                                         extra_body={"return_token_ids": True})
        rpc = stub.Generate(gpb.GenerateRequest(prompt_ids=gpb.TokenIds(ids=prompt_ids[i]),
                                                max_new_tokens=BUDGETS[i]), timeout=120)
        return http, rpc

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(both, range(len(PROMPTS))))
    for i, (http, rpc) in enumerate(results):
        choice = http.choices[0]
        assert choice.token_ids == list(rpc.token_ids) == expected[i], f"prompt {i}"
        assert choice.text == rpc.text
        assert choice.prompt_token_ids == prompt_ids[i]
        assert choice.finish_reason == ("length" if rpc.finish_reason == gpb.FINISH_REASON_LENGTH else "stop")
        assert http.usage.completion_tokens == len(expected[i]) and http.usage.prompt_tokens == len(prompt_ids[i])
        assert http.usage.total_tokens == http.usage.prompt_tokens + http.usage.completion_tokens
        assert http.object == "text_completion" and http.model == MODEL and http.id.startswith("cmpl-")
    assert sum(h.speculation["drafted_tokens"] for h, _ in results) > 0
    wait_kv_free(cluster)


def test_chat_applies_the_chat_template(cluster, client, tokenizer):
    """Chat completions and gRPC `messages` both render the target's template: the same output as the demo format
    sent as a raw prompt."""
    stub = grpc_stub(cluster)
    raw = stub.Generate(gpb.GenerateRequest(prompt=chat(PROMPTS[0]), max_new_tokens=24), timeout=120)
    msg = gpb.GenerateRequest(max_new_tokens=24)
    msg.messages.messages.add(role="user", content=PROMPTS[0])
    via_messages = stub.Generate(msg, timeout=120)
    http = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=24, temperature=0)
    assert list(via_messages.token_ids) == list(raw.token_ids)
    assert http.choices[0].message.content == raw.text and http.choices[0].message.role == "assistant"
    assert http.object == "chat.completion" and http.id.startswith("chatcmpl-")
    assert http.usage.prompt_tokens == len(tokenizer.encode(chat(PROMPTS[0]), add_special_tokens=False))
    spec = http.speculation  # per-request acceptance, in both APIs
    assert spec["num_drafts"] == via_messages.speculation.num_drafts > 0
    assert spec["mean_acceptance_length"] == pytest.approx(1 + spec["accepted_tokens"] / spec["num_drafts"])
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["drafted_tokens"])
    assert via_messages.speculation.mean_acceptance_length == pytest.approx(
        1 + via_messages.speculation.accepted_tokens / via_messages.speculation.num_drafts)


def test_chat_stream_equals_unary_with_multi_token_deltas(cluster, client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": PROMPTS[2]}], max_completion_tokens=33,
                  temperature=0)
    unary = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                 extra_body={"return_token_ids": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in content) == unary.choices[0].message.content
    assert max(len(c.choices[0].token_ids) for c in content) > 1  # a verify step's accepted tokens in one delta
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == unary.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == unary.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert last.speculation == unary.speculation


def test_completions_stream_seed_top_k_and_stop(cluster, client, expected, tokenizer):
    prompt = chat(PROMPTS[5])
    sampled = dict(model=MODEL, prompt=prompt, max_tokens=20, temperature=0.9, top_p=0.95, seed=42,
                   extra_body={"top_k": 40, "ignore_eos": True})
    a = client.completions.create(**sampled)
    b = "".join(c.choices[0].text for c in client.completions.create(stream=True, **sampled))
    assert a.choices[0].text == b and a.usage.completion_tokens == 20  # seeded: reproducible, streamed or not
    full = tokenizer.decode(expected[0], skip_special_tokens=True)
    stop = full[len(full) // 2:][:3]
    if stop.strip():
        r = client.completions.create(model=MODEL, prompt=chat(PROMPTS[0]), max_tokens=BUDGETS[0], temperature=0,
                                      stop=stop)
        assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
        assert full.startswith(r.choices[0].text)
    wait_kv_free(cluster)


def test_errors_are_openai_shaped(cluster, client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=4)
    assert exc.value.body["code"] == "model_not_found" and "gpt-17" in exc.value.body["message"]
    bad = [dict(max_tokens=0), dict(n=2), dict(logprobs=2), dict(temperature=-1), dict(max_tokens=10 ** 6),
           dict(extra_body={"top_k": -5}), dict(prompt=["a", "b"])]
    for fields in bad:
        fields = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields}
        with pytest.raises(openai.BadRequestError) as exc:
            client.completions.create(**fields)
        assert exc.value.status_code == 400 and exc.value.body["type"] == "invalid_request_error", fields
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    r = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-d", "{not json", cluster.http_url + "/v1/completions"],
                       capture_output=True, text=True, timeout=30)
    body, code = r.stdout.rsplit("\n", 1)
    assert code == "400" and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    r = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", cluster.http_url + "/v1/nope"], capture_output=True,
                       text=True, timeout=30)
    assert r.stdout.rsplit("\n", 1)[1] == "404"
    wait_kv_free(cluster)


def test_models_and_health(cluster, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    r = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", cluster.http_url + "/health"], capture_output=True,
                       text=True, timeout=30)
    assert r.stdout.rsplit("\n", 1)[1] == "200"


def test_cancelled_stream_frees_kv(cluster, client):
    stream = client.completions.create(model=MODEL, prompt=chat(PROMPTS[2]), max_tokens=1500, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    got = 0
    for _ in stream:
        got += 1
        if got == 3:
            break
    stream.close()  # the connection goes: the router cancels the request
    wait_kv_free(cluster)
    # Unary, the client giving up before the answer: cancelled too.
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(model=MODEL, prompt=chat(PROMPTS[2]), max_tokens=1500,
                                                            extra_body={"ignore_eos": True})
    wait_kv_free(cluster)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_sse_framing_with_curl(cluster):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 17,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    r = subprocess.run(["curl", "-sS", "-N", "-i", "-H", "Content-Type: application/json", "-d", body,
                        cluster.http_url + "/v1/chat/completions"], capture_output=True, timeout=120)
    head, _, events = r.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in head.lower()
    assert events.endswith("data: [DONE]\n\n")
    frames = events.split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), frames
    payloads = [json.loads(f[len("data: "):]) for f in frames[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 17


def test_metrics_agree_with_the_responses(cluster, client, prompt_ids):
    """Counters after a run: accepted tokens, drafts, tokens and requests add up to what the responses reported."""
    wait_kv_free(cluster)
    before = scrape(cluster)

    def one(i):
        if i % 2:
            return client.completions.create(model=MODEL, prompt=prompt_ids[i], max_tokens=BUDGETS[i], temperature=0)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt_ids[i], max_tokens=BUDGETS[i],
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        return chunks[-1]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, range(len(PROMPTS))))
    wait_kv_free(cluster)
    after = scrape(cluster)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    spec = [r.speculation for r in results]
    n = len(PROMPTS)
    assert delta("vllm:spec_decode_num_accepted_tokens_total") == sum(s["accepted_tokens"] for s in spec) > 0
    assert delta("vllm:spec_decode_num_draft_tokens_total") == sum(s["drafted_tokens"] for s in spec)
    assert delta("vllm:spec_decode_num_drafts_total") == sum(s["num_drafts"] for s in spec)
    assert delta("vllm:spec_decode_num_accepted_tokens_per_pos_total") == sum(s["accepted_tokens"] for s in spec)
    assert delta("vllm:spec_decode_num_accepted_tokens_per_pos_total", position="0") >= \
        delta("vllm:spec_decode_num_accepted_tokens_per_pos_total", position="2")
    assert delta("vllm:generation_tokens_total") == sum(r.usage.completion_tokens for r in results)
    assert delta("vllm:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in results)
    assert delta("vllm:request_success_total", finished_reason="length") + \
        delta("vllm:request_success_total", finished_reason="stop") == n
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
              "request_prefill_time_seconds", "request_decode_time_seconds", "request_generation_tokens"):
        assert delta(f"vllm:{h}_count") == n, h
    assert delta("vllm:inter_token_latency_seconds_count") > 0
    assert delta("minedraft:schedule_ticks_total", schedule="psd") > 0
    assert total(after, "minedraft:schedule", schedule="psd") == 1 and total(after, "minedraft:schedule") == 1
    assert total(after, "vllm:num_requests_running") == total(after, "vllm:num_requests_waiting") == 0
    assert total(after, "vllm:kv_cache_usage_perc") == 0
    for role in ("verifier", "drafter"):
        assert total(after, "minedraft:replica_up", role=role) == 1
        assert total(after, "minedraft:kv_blocks_total", role=role) > 0
        assert delta("minedraft:busy_seconds_total", role=role) > 0
        assert 0 <= total(after, "minedraft:busy_fraction", role=role) <= 1


def test_dashboard_uses_exposed_metrics(cluster):
    """Every metric docs/grafana-dashboard.json queries is one /metrics exposes."""
    dashboard = json.loads((REPO_ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b((?:vllm|minedraft):[a-z0-9_]+)", e)}
    exposed = {k.split("{")[0] for k in scrape(cluster)}
    assert used and not used - exposed, used - exposed


def test_sigterm_drains_http_streams_and_refuses_new(tmp_path):
    """Drain over HTTP as over gRPC: health 503 and new requests 503 at once, the running stream finishes whole."""
    with running_cluster(tmp_path, mode="psd", http_port=0, drain_timeout_s=60, clean_exit=False) as c:
        client = openai.OpenAI(base_url=c.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = iter(client.completions.create(model=MODEL, prompt=chat(PROMPTS[2]), max_tokens=300,
                                                temperature=0, stream=True,
                                                extra_body={"ignore_eos": True, "return_token_ids": True}))
        chunks = [next(stream)]
        c.procs["router"].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", c.http_url + "/health"],
                             capture_output=True, text=True, timeout=10).stdout != "503":
            assert time.monotonic() < deadline, "/health still 200 after SIGTERM"
            time.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as exc:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert exc.value.status_code == 503 and "draining" in exc.value.message
        chunks += list(stream)
        assert sum(len(ch.choices[0].token_ids) for ch in chunks) == 300
        assert chunks[-1].choices[0].finish_reason == "length"
        assert c.procs["router"].wait(30) == 0
    log = (tmp_path / "router.log").read_text()
    assert not [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line], log[-3000:]


def test_busy_window():
    from services.model_service import BusyWindow

    w = BusyWindow(window_s=10.0)
    w.started(100.0)
    w.ended(102.0)  # 2 s of work
    w.started(105.0)  # running since 105
    assert w.fraction(106.0) == pytest.approx(0.3)
    w.ended(106.0)
    assert w.fraction(111.0) == pytest.approx(0.2)  # the first step is half out of the window
    assert w.fraction(200.0) == 0


def test_draft_ahead_outcomes_are_counted():
    """minedraft:draft_ahead counts, per sequence, the drafts made ahead that a lane used and those it discarded."""
    from services.router.metrics import LaneMetrics, Metrics

    m = Metrics()
    m.model_name = "demo"
    lane = m.lane("ahead")
    lane.drafted_ahead(3, 1)
    lane.drafted_ahead(0, 2)
    LaneMetrics().drafted_ahead(5, 5)  # a lane without a router records nothing

    def value(outcome):
        return m.registry.get_sample_value("minedraft:draft_ahead_total", {"model_name": "demo", "outcome": outcome})
    assert (value("hit"), value("miss")) == (3.0, 3.0)


# ---- in process: the app without a cluster ---------------------------------------------------------------------------
async def asgi(app, method: str, path: str, body: dict | None = None, headers=()) -> tuple[int, dict]:
    """One request through an ASGI app; (status, JSON body)."""
    sent = [{"type": "http.request", "body": json.dumps(body).encode() if body is not None else b"",
             "more_body": False}]
    out = []

    async def receive():
        if sent:
            return sent.pop()
        await asyncio.sleep(3600)

    async def send(message):
        out.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "path": path, "raw_path": path.encode(), "query_string": b"", "scheme": "http",
             "headers": [(k.encode(), v.encode()) for k, v in headers], "server": ("t", 80), "client": ("t", 1)}
    await app(scope, receive, send)
    status = next(m["status"] for m in out if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
    return status, json.loads(data) if data else {}


def test_status_mapping_in_process():
    from services.router.frontend import BearerToken, Frontend
    from services.router.http_api import create_app
    from services.router.request import QueueFull

    class Full(Frontend):
        async def start(self, req, default_max_new_tokens=False):
            raise QueueFull("queue full (0 waiting requests)")

    chat_body = {"messages": [{"role": "user", "content": "hi"}]}
    waiting = create_app(Frontend())  # not attached: the router is waiting for its model services
    assert asyncio.run(asgi(waiting, "GET", "/health"))[0] == 503
    status, body = asyncio.run(asgi(waiting, "POST", "/v1/chat/completions", chat_body))
    assert status == 503 and body["error"]["code"] == "unavailable"
    status, body = asyncio.run(asgi(create_app(Full()), "POST", "/v1/chat/completions", chat_body))
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    secured = create_app(Frontend(), BearerToken("s3cret"))
    status, body = asyncio.run(asgi(secured, "POST", "/v1/chat/completions", chat_body))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _ = asyncio.run(asgi(secured, "POST", "/v1/chat/completions", chat_body,
                                 headers=[("authorization", "Bearer s3cret")]))
    assert status == 503  # past the token check
    assert asyncio.run(asgi(secured, "GET", "/health"))[0] == 503  # open without the token
    status, body = asyncio.run(asgi(waiting, "POST", "/v1/completions", {"prompt": "hi", "tools": [{"x": 1}]}))
    assert status == 400 and "tools" in body["error"]["message"]


def test_messages_without_a_chat_template_are_invalid(tokenizer):
    """A model without a chat template: `messages` is INVALID_ARGUMENT (gRPC) / 400 (HTTP), saying why."""
    from copy import deepcopy

    from services.router.frontend import Frontend, InvalidRequest
    from services.router.http_api import create_app

    plain = deepcopy(tokenizer)
    plain.chat_template = None
    pool = SimpleNamespace(max_len=2048, vocab_size=4096, eos_ids=frozenset(), serving=True, draining=False,
                           cfg=SimpleNamespace(max_new_tokens_limit=4096), fits_ever=lambda r: True,
                           submit=lambda r: None)
    info = gpb.ServerInfo(target_model="plain", num_speculative_tokens=3)
    frontend = Frontend().attach(pool, plain, info)
    req = gpb.GenerateRequest(max_new_tokens=4)
    req.messages.messages.add(role="user", content="hi")
    with pytest.raises(InvalidRequest, match="no chat template"):
        asyncio.run(frontend.start(req))
    status, body = asyncio.run(asgi(create_app(frontend), "POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "hi"}]}))
    assert status == 400 and "no chat template" in body["error"]["message"]
    with_template = Frontend().attach(pool, tokenizer, info)
    stream = asyncio.run(with_template.start(req))
    assert stream.request.seq.prompt == tokenizer.encode(chat("hi"), add_special_tokens=False)
