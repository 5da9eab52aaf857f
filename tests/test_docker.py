"""Docker: build the image, `docker-compose up` (router health-gated on drafter and verifier), Generate through the
router's published port with greedy output equal to target-only decoding computed here in-process, the router
negotiating the zero-copy shm transport through the shared /dev/shm volume, `--scale drafter=2 --scale verifier=2`
with both verifier replicas serving sequences, and `down` leaving nothing behind.

Marker `docker` (excluded from the default run), except the two healthcheck tests, which need no engine. `.ci/run` runs it through docker/ci.sh, which first makes a Docker
engine and a local base image available. Skips when no Docker engine answers.

Environment: MINEDRAFT_BASE_IMAGE (docker/build.sh's default: minedraft-base:local when present, else
python:3.11-slim), MINEDRAFT_COMPOSE (compose command; default `docker-compose` when installed, else
`docker compose`), MINEDRAFT_TEST_IMAGE (tag to build, default minedraft-serve:test).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from minedraft.config import DEMO_TARGET
from support import chat, target_only

docker = pytest.mark.docker  # every test here but the healthcheck ones (which need no engine and run by default)

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("MINEDRAFT_TEST_IMAGE", "minedraft-serve:test")
COMPOSE_FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.override.yml"]
PROMPTS = [
    "Hello, how are you?",
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
    "Summarise the plot of a detective story in three sentences.",
]
BUDGETS = [40, 24, 12, 32]
TIMINGS: dict[str, float] = {}


def run(args: list[str], timeout: float = 300, env: dict | None = None, check: bool = True) -> str:
    """Run a command in the repository root; stdout+stderr as text. On failure, the output's tail is in the error."""
    p = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(args)} exited {p.returncode}:\n{p.stdout[-4000:]}")
    return p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_command() -> list[str]:
    if os.environ.get("MINEDRAFT_COMPOSE"):
        return shlex.split(os.environ["MINEDRAFT_COMPOSE"])
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


@pytest.fixture(scope="module")
def docker_engine():
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI (docker/start-dockerd.sh installs and starts an engine)")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no Docker engine answers `docker info` (docker/start-dockerd.sh starts one)")


@pytest.fixture(scope="module")
def image(docker_engine):
    t0 = time.monotonic()
    out = run(["bash", "docker/build.sh", "-t", IMAGE], timeout=2400)
    TIMINGS["image build (s)"] = time.monotonic() - t0
    size = run(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE]).strip()
    TIMINGS["image size (MB)"] = int(size) / 1e6
    assert "built " + IMAGE in out
    return IMAGE


class Project:
    def __init__(self, name: str, port: int):
        self.name, self.port = name, port
        self.env = dict(os.environ, MINEDRAFT_IMAGE=IMAGE, MINEDRAFT_PORT=str(port), COMPOSE_PROJECT_NAME=name,
                        MINEDRAFT_HTTP_PORT=str(free_port()))
        self.log_file: Path | None = None  # `down` saves the project's logs here first

    def compose(self, *args: str, timeout: float = 600) -> str:
        return run([*compose_command(), "-p", self.name, *COMPOSE_FILES, *args], timeout=timeout, env=self.env)

    def containers(self, service: str | None = None, all_states: bool = False) -> list[str]:
        args = ["docker", "ps", "-q", "--no-trunc", "--filter", f"label=com.docker.compose.project={self.name}"]
        if all_states:
            args.append("-a")
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        return run(args).split()

    def health(self, cid: str) -> str:
        return run(["docker", "inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", cid]).strip()

    def wait_healthy(self, counts: dict[str, int], timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            states = {s: [self.health(c) for c in self.containers(s)] for s in counts}
            if all(len(v) == counts[s] and all(h == "healthy" for h in v) for s, v in states.items()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not healthy after {timeout_s:.0f}s: {states}\n{self.logs()[-6000:]}")
            time.sleep(2)

    def logs(self, service: str = "") -> str:
        return run([*compose_command(), "-p", self.name, *COMPOSE_FILES, "logs", "--no-color",
                    *([service] if service else [])], env=self.env, check=False)

    def model_info(self, cid: str, kind: str):
        """GetModelInfo of one replica, asked from inside its container (model services publish no port)."""
        port = 50062 if kind == "verifier" else 50061
        code = ("import grpc; from minedraft.v1 import model_service_pb2 as m, model_service_pb2_grpc as g; "
                f"i = g.{kind.capitalize()}Stub(grpc.insecure_channel('127.0.0.1:{port}'))"
                ".GetModelInfo(m.ModelInfoRequest(), timeout=20); print(i.busy_seconds)")
        return float(run(["docker", "exec", cid, "python", "-c", code], timeout=60).strip().splitlines()[-1])

    def down(self) -> None:
        if self.containers(all_states=True) and self.log_file is not None:
            self.log_file.write_text(self.logs())
            print(f"\ncompose logs: {self.log_file}")
        self.compose("down", "-v", "--remove-orphans", "-t", "20", timeout=300)


@pytest.fixture(scope="module")
def project(image, tmp_path_factory):
    p = Project(f"minedrafttest{os.getpid()}", free_port())
    p.log_file = tmp_path_factory.mktemp("docker-logs") / "compose.log"
    try:
        t0 = time.monotonic()
        p.compose("up", "-d")
        p.wait_healthy({"drafter": 1, "verifier": 1, "router": 1})
        TIMINGS["compose up to healthy (s)"] = time.monotonic() - t0
        yield p
    finally:
        p.down()
        print("docker test timings: " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def expected():
    """Target-only greedy continuations of the demo target, computed in this process (EOS honoured)."""
    return target_only(PROMPTS, BUDGETS, model=DEMO_TARGET)


def generate_all(port: int, prompts: list[str], budgets: list[int], **kw) -> list[list[int]]:
    from minedraft.v1 import generate_pb2 as gpb, generate_pb2_grpc

    stub = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def one(i):
        req = gpb.GenerateRequest(prompt=chat(prompts[i]), max_new_tokens=budgets[i], **kw)
        return list(stub.Generate(req, timeout=300).token_ids)

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, range(len(prompts))))


def lane_lines(router_log: str) -> list[str]:
    return re.findall(r"lane \d+: verifier \S+ \+ drafter \S+ \(transport \w+\)", router_log)


@docker
def test_compose_generate_matches_local(project, expected):
    from minedraft.v1 import common_pb2, generate_pb2 as gpb, generate_pb2_grpc

    # only the router's port is published
    for service in ("drafter", "verifier"):
        (cid,) = project.containers(service)
        assert run(["docker", "port", cid]).strip() == "", f"{service} publishes a port"
    lanes = lane_lines(project.logs("router"))
    assert len(lanes) == 1 and lanes[0].endswith("(transport shm)"), lanes

    t0 = time.monotonic()
    assert generate_all(project.port, PROMPTS, BUDGETS) == expected
    TIMINGS["greedy requests (s)"] = time.monotonic() - t0

    # sampling sends draft probabilities through the shared /dev/shm; every segment is released afterwards
    stub = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(f"127.0.0.1:{project.port}"))
    req = gpb.GenerateRequest(prompt=chat(PROMPTS[0]), max_new_tokens=24, ignore_eos=True,
                              sampling=common_pb2.SamplingOptions(temperature=0.8, top_p=0.95, seed=7))
    assert len(stub.Generate(req, timeout=300).token_ids) == 24
    (drafter,) = project.containers("drafter")
    deadline = time.monotonic() + 15
    while (left := run(["docker", "exec", drafter, "sh", "-c", "ls /dev/shm | grep -c '^minedraft-' || true"]).strip()) \
            != "0" and time.monotonic() < deadline:
        time.sleep(1)
    assert left == "0", f"{left} shm segments left in the shared volume"


@docker
def test_scale_two_drafters_two_verifiers(project, expected):
    t0 = time.monotonic()
    project.compose("up", "-d", "--scale", "drafter=2", "--scale", "verifier=2")
    project.wait_healthy({"drafter": 2, "verifier": 2, "router": 1})
    deadline = time.monotonic() + 90  # the router re-resolves the service names every 5 s
    while len(lanes := lane_lines(project.logs("router"))) < 2 and time.monotonic() < deadline:
        time.sleep(2)
    TIMINGS["scale to 2+2 (s)"] = time.monotonic() - t0
    assert len(lanes) == 2 and all(line.endswith("(transport shm)") for line in lanes), lanes
    verifiers = project.containers("verifier")
    assert len(verifiers) == 2 and len(project.containers("drafter")) == 2

    before = {c: project.model_info(c, "verifier") for c in verifiers}
    out = generate_all(project.port, PROMPTS * 2, BUDGETS * 2)
    assert out == expected * 2
    after = {c: project.model_info(c, "verifier") for c in verifiers}
    assert all(after[c] > before[c] for c in verifiers), f"a verifier replica served nothing: {before} -> {after}"


@docker
def test_down_leaves_nothing(project):
    project.down()
    assert project.containers(all_states=True) == []
    assert run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project.name}"]) \
        .strip() == ""


@docker
@pytest.mark.skipif(os.environ.get("MINEDRAFT_DOCKER_SWARM") != "1",
                    reason="opt-in (MINEDRAFT_DOCKER_SWARM=1): makes this Docker engine a one-node swarm for a while")
def test_swarm_stack_deploy(image, expected):
    """`docker stack deploy -c docker-compose.yml` on a one-node swarm (advertised on loopback): the router retries
    until the model services resolve, pairs them over shm, serves; `docker service scale` adds a second lane.
    Requests go from inside the router's container: the published port rides Swarm's routing mesh, which needs IPVS
    in the kernel (absent on some sandboxes)."""
    if run(["docker", "info", "-f", "{{.Swarm.LocalNodeState}}"]).strip() != "inactive":
        pytest.skip("this Docker engine is already part of a swarm")
    name = f"minedraftswarm{os.getpid()}"
    env = dict(os.environ, MINEDRAFT_IMAGE=image, MINEDRAFT_PORT=str(free_port()), MINEDRAFT_HTTP_PORT=str(free_port()))
    run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"])
    try:
        run(["docker", "stack", "deploy", "-c", "docker-compose.yml", name], env=env)

        def router_log() -> str:
            return run(["docker", "service", "logs", "--raw", f"{name}_router"], check=False)

        def router_container() -> str:
            ids = run(["docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={name}_router",
                       "--filter", "health=healthy"]).split()
            return ids[0] if ids else ""

        deadline = time.monotonic() + 300
        while not (cid := router_container()) and time.monotonic() < deadline:
            time.sleep(3)
        assert cid, f"router not healthy:\n{router_log()[-4000:]}"
        # healthy is the liveness check (a router waiting for its replicas is alive): the lane comes when they resolve
        while not lane_lines(router_log()) and time.monotonic() < deadline:
            time.sleep(3)
        assert [line.endswith("(transport shm)") for line in lane_lines(router_log())] == [True], router_log()[-4000:]

        code = ("import grpc, json; from minedraft.v1 import generate_pb2 as g, generate_pb2_grpc as gg; "
                "s = gg.GenerationStub(grpc.insecure_channel('127.0.0.1:50051')); "
                "print(json.dumps([list(s.Generate(g.GenerateRequest(prompt=p, max_new_tokens=n), timeout=300)"
                f".token_ids) for p, n in {list(zip(map(chat, PROMPTS), BUDGETS))!r}]))")

        assert json.loads(run(["docker", "exec", cid, "python", "-c", code]).strip().splitlines()[-1]) == expected

        run(["docker", "service", "scale", "-d", f"{name}_verifier=2", f"{name}_drafter=2"])
        deadline = time.monotonic() + 180
        while len(lanes := lane_lines(router_log())) < 2 and time.monotonic() < deadline:
            time.sleep(3)
        assert len(lanes) == 2 and all(line.endswith("(transport shm)") for line in lanes), lanes
    finally:
        run(["docker", "stack", "rm", name], check=False)
        deadline = time.monotonic() + 120
        while run(["docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={name}"]).strip() \
                and time.monotonic() < deadline:
            time.sleep(2)
        for _ in range(10):  # the volume is released a moment after its last container
            if run(["docker", "volume", "rm", f"{name}_shm"], check=False).strip() == f"{name}_shm" or \
                    not run(["docker", "volume", "ls", "-q", "--filter", f"name={name}_shm"]).strip():
                break
            time.sleep(2)
        run(["docker", "swarm", "leave", "--force"], check=False)
        run(["docker", "network", "rm", "docker_gwbridge"], check=False)
    assert run(["docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={name}"]).strip() == ""


# ---- minedraft.healthcheck (the image's HEALTHCHECK): no Docker needed, part of the default run ------------------

def test_healthcheck_exit_code_follows_serving_status():
    import asyncio
    import sys
    import threading

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def serve():
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        state["port"] = server.add_insecure_port("127.0.0.1:0")
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await servicer.set("minedraft.v1.Verifier", health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        state["server"], state["servicer"] = server, servicer
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)

    def probe(*args: str) -> int:
        return subprocess.run([sys.executable, "-m", "minedraft.healthcheck", "--port", str(state["port"]), *args],
                              cwd=ROOT, capture_output=True, timeout=30).returncode

    try:
        assert probe() == 1  # NOT_SERVING
        assert probe("--service", "minedraft.v1.Verifier") == 0
        asyncio.run_coroutine_threadsafe(state["servicer"].set("", health_pb2.HealthCheckResponse.SERVING),
                                         loop).result(10)
        assert probe() == 0
        assert probe("--service", "no.such.Service") == 1  # NOT_FOUND
    finally:
        asyncio.run_coroutine_threadsafe(state["server"].stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert probe() == 1  # nothing listening: UNAVAILABLE


def test_healthcheck_detects_the_port_of_the_service_in_the_container(tmp_path, monkeypatch):
    from minedraft.healthcheck import detect_port

    def fake_proc(*cmdlines: list[str]) -> str:
        for pid, argv in enumerate(cmdlines, start=1):
            (tmp_path / str(pid)).mkdir()
            (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        return str(tmp_path)

    for key in ("MINEDRAFT_HEALTHCHECK_PORT", "MINEDRAFT_ROUTER_PORT", "MINEDRAFT_DRAFTER_PORT",
                "MINEDRAFT_VERIFIER_PORT"):
        monkeypatch.delenv(key, raising=False)
    proc = fake_proc(["/bin/sh"], ["python", "-m", "services.verifier"])
    assert detect_port(proc) == 50062
    monkeypatch.setenv("MINEDRAFT_VERIFIER_PORT", "7001")
    assert detect_port(proc) == 7001
    monkeypatch.setenv("MINEDRAFT_HEALTHCHECK_PORT", "7002")
    assert detect_port(proc) == 7002
    monkeypatch.delenv("MINEDRAFT_HEALTHCHECK_PORT")
    proc2 = tmp_path / "two"
    proc2.mkdir()
    (proc2 / "9").mkdir()
    (proc2 / "9" / "cmdline").write_bytes(b"python\0-m\0services.router\0--port\0" + b"6000\0")
    assert detect_port(str(proc2)) == 6000
    with pytest.raises(SystemExit):
        detect_port(str(tmp_path / "1"))  # no service process at all
