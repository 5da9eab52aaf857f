"""Reliability as a user meets it: the supervised `minedraft up`, honest health, graceful drain, readable info, logs.

- `minedraft up` (the real CLI, in a subprocess) restarts a model service killed with SIGKILL mid-stream; 4 concurrent
  streams complete with the same tokens as an undisturbed run, first with the drafter killed, then the verifier.
- With its only verifier gone the router says NOT_SERVING and refuses new requests at once (UNAVAILABLE, with why);
  when the verifier is back it serves again.
- SIGTERM drains: new requests are refused (UNAVAILABLE), health is NOT_SERVING, in-flight streams finish; past the
  drain deadline the rest are cancelled, and nothing stays held on the services.
- `minedraft info` prints each replica's liveness, KV use and queue; a clean run logs no warning; a fault is one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minedraft.launcher import free_port, wait_serving
from minedraft.runtime.transport import leftover_segments
from minedraft.v1 import generate_pb2 as gpb, generate_pb2_grpc
from support import DRAFT, FAULT_PROMPTS, TARGET, chat, running_cluster, wait_kv_free

STREAMS = FAULT_PROMPTS + ["Explain how a bicycle works."]  # 4 concurrent streams
N = 120


def stream_all(address: str, n: int = N, during=None, prompts=STREAMS) -> list:
    """Stream every prompt concurrently; call `during()` once tokens flow. Each result: token list or RpcError."""
    stub = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(address))
    started = threading.Event()

    def one(p):
        toks = []
        try:
            for m in stub.GenerateStream(gpb.GenerateRequest(prompt=chat(p), max_new_tokens=n, ignore_eos=True),
                                         timeout=300):
                toks.extend(m.token_ids)
                started.set()
        except grpc.RpcError as exc:
            return exc
        return toks

    with ThreadPoolExecutor(len(prompts)) as pool:
        futs = [pool.submit(one, p) for p in prompts]
        if during is not None:
            assert started.wait(60)
            time.sleep(0.3)
            during()
        return [f.result() for f in futs]


def health(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def wait_health(address: str, want: str, timeout_s: float = 15.0) -> float:
    t = time.monotonic()
    while (state := health(address)) != want:
        assert time.monotonic() - t < timeout_s, f"health {state}, want {want}"
        time.sleep(0.1)
    return time.monotonic() - t


def generate(address: str, prompt: str = "hi", n: int = 8, timeout: float = 60):
    stub = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(address))
    return stub.Generate(gpb.GenerateRequest(prompt=chat(prompt), max_new_tokens=n, ignore_eos=True),
                         timeout=timeout)


def log_lines(log_dir: Path, role: str, *levels: str) -> list[str]:
    text = (log_dir / f"{role}.log").read_text(errors="replace")
    return [line for line in text.splitlines() if any(f" {lv} " in line for lv in levels)]


# ---- the supervised launcher ---------------------------------------------------------------------------------------
def children(pid: int) -> dict[str, int]:
    """role -> pid of the launcher's child processes (python -m services.<role>)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"-m" in argv:
            module = argv[argv.index(b"-m") + 1].decode()
            if module.startswith("services."):
                out[module.removeprefix("services.")] = int(entry.name)
    return out


def port_of(pid: int) -> int:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(argv[argv.index(b"--port") + 1])


def test_supervised_up_survives_drafter_then_verifier_kill(tmp_path):
    port = free_port()
    logs = tmp_path / "logs"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    up = subprocess.Popen([sys.executable, "-m", "minedraft.cli", "up", "--port", str(port), "--log-dir", str(logs),
                           "--http-port", str(free_port()),
                           "--target", TARGET, "--draft", DRAFT, "-k", "3", "--drain-timeout-s", "10"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    address = f"127.0.0.1:{port}"
    pids = set()
    try:
        wait_serving(address, 180, up)
        clean = stream_all(address)
        assert all(isinstance(t, list) and len(t) == N for t in clean)
        for role in ("drafter", "verifier"):
            pids |= set(children(up.pid).values())
            victim = children(up.pid)[role]
            t = time.monotonic()
            out = stream_all(address, during=lambda: os.kill(victim, signal.SIGKILL))
            assert out == clean, f"outputs changed when the {role} was killed"
            print(f"{role} killed mid-stream: 4 streams of {N} tokens finished {time.monotonic() - t:.1f} s after "
                  f"the start, identical to the undisturbed run")
            deadline = time.monotonic() + 60
            while children(up.pid).get(role) in (None, victim):  # restarted under a new pid
                assert time.monotonic() < deadline and up.poll() is None
                time.sleep(0.2)
            wait_serving(f"127.0.0.1:{port_of(children(up.pid)[role])}", 120)
        assert stream_all(address) == clean  # speculation back on the restarted drafter, same tokens
        pids |= set(children(up.pid).values())
    finally:
        up.send_signal(signal.SIGTERM)
        output = up.communicate(timeout=90)[0]
    print(output)
    assert up.returncode == 0, output
    for role in ("drafter", "verifier"):
        assert f"{role} exited (killed by SIGKILL); restarting" in output
    assert not [p for p in pids if Path(f"/proc/{p}").exists()] and not leftover_segments()
    # One line per fault event in the router's log, and no error.
    router_warnings = log_lines(logs, "router", "WARNING", "ERROR")
    assert not log_lines(logs, "router", "ERROR"), router_warnings
    assert len([w for w in router_warnings if "drafter" in w and "lost" in w]) == 1, router_warnings
    assert len([w for w in router_warnings if "verifier" in w and "lost" in w]) == 1, router_warnings


def test_restart_policy_backs_off_and_gives_up():
    from minedraft.supervisor import RestartPolicy

    p = RestartPolicy(backoff_s=1, max_backoff_s=8)
    assert [p.delay(i) for i in range(6)] == [1, 2, 4, 8, 8, 8]


# ---- health, drain --------------------------------------------------------------------------------------------------
CLUSTER = dict(mode="psd", clean_exit=False, drain_timeout_s=60, router_args=["--num-speculative-tokens", "3"])


def test_no_verifier_means_not_serving_and_unavailable_at_once(fresh_cluster):
    c = fresh_cluster
    expected = list(generate(c.address).token_ids)
    c.kill("verifier")
    waited = wait_health(c.address, "NOT_SERVING", timeout_s=10)
    t = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        generate(c.address, timeout=30)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "no verifier is reachable" in exc.value.details()
    assert time.monotonic() - t < 2
    info = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(c.address)).GetInfo(gpb.GetInfoRequest(),
                                                                                       timeout=10)
    assert not info.serving and [r.live for r in info.replicas if r.role == "verifier"] == [False]
    c.restart("verifier")
    back = wait_health(c.address, "SERVING", timeout_s=10)
    assert list(generate(c.address).token_ids) == expected
    print(f"NOT_SERVING {waited:.1f} s after the kill; SERVING {back:.1f} s after the verifier was back")


def test_sigterm_drains_in_flight_and_refuses_new(fresh_cluster):
    c = fresh_cluster
    clean = stream_all(c.address)
    seen = {}

    def terminate():
        c.procs["router"].send_signal(signal.SIGTERM)
        seen["health"] = wait_health(c.address, "NOT_SERVING", timeout_s=5)
        with pytest.raises(grpc.RpcError) as exc:
            generate(c.address, timeout=10)
        seen["refused"] = (exc.value.code(), exc.value.details())

    out = stream_all(c.address, during=terminate)
    assert out == clean  # every in-flight stream finished, whole
    assert seen["refused"][0] == grpc.StatusCode.UNAVAILABLE and "draining" in seen["refused"][1]
    assert c.procs["router"].wait(30) == 0
    assert not log_lines(Path(c.log_dir), "router", "WARNING", "ERROR")


def test_drain_deadline_cancels_the_rest(tmp_path):
    with running_cluster(tmp_path, mode="psd", drain_timeout_s=1.0) as c:
        t = {}

        def terminate():
            t["sigterm"] = time.monotonic()
            c.procs["router"].send_signal(signal.SIGTERM)

        out = stream_all(c.address, n=1500, during=terminate)
        assert all(isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE for e in out), out
        assert c.procs["router"].wait(30) == 0
        assert time.monotonic() - t["sigterm"] < 15
        c.procs.pop("router")
        wait_kv_free(c, timeout_s=30)  # the services freed what the stopped router held


# ---- info, logs -----------------------------------------------------------------------------------------------------
def test_info_is_readable_and_a_clean_run_logs_no_warning(tmp_path):
    with running_cluster(tmp_path, mode="psd") as c:
        assert len(generate(c.address, n=16).token_ids) == 16
        cmd = [sys.executable, "-m", "minedraft.cli", "info", "--address", c.address]
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
        raw = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=60,
                                        check=True).stdout)
    print(text)
    assert "SERVING" in text and "mode psd" in text
    rows = {line.split()[1]: line for line in text.splitlines()[4:] if len(line.split()) > 2}
    assert set(rows) == {"verifier", "drafter"} and all(" yes " in r for r in rows.values())
    assert "KV blocks in use" in text and "transport" in text
    assert raw["serving"] is True and {r["role"] for r in raw["replicas"]} == {"verifier", "drafter"}
    for role in ("router", "drafter", "verifier"):
        assert not log_lines(tmp_path, role, "WARNING", "ERROR", "CRITICAL"), role
