"""Drafter, verifier and router on three hosts (network namespaces with their own addresses, IPC and /dev/shm; see
tests/netns.py): what the card promises for separate machines, shown on real links instead of loopback.

- the router negotiates inline transport: the shm probe fails, because the verifier cannot see the drafter's
  /dev/shm (same kernel, so the same boot id: the router does try shm first, and must find out by probing);
- greedy output is identical to target-only decoding, in psd and in the default auto mode;
- seeded sampled requests are reproducible (pinned psd: under auto the schedule follows the timings, see
  test_e2e.py), whether sent together or one by one;
- the same over TLS (server-only) and mutual TLS between the hosts, with certificates naming the IPs the router
  dials; a client without the router's certificate cannot even connect to a model service under mTLS.

Marker `netns` (root, excluded by default): `python -m pytest -m netns -q`. Faults and latency: test_netns_faults.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import grpc
import pytest

import netns
from minedraft.v1 import common_pb2, generate_pb2 as gpb
from support import BUDGETS, DRAFT, PROMPTS, TARGET, chat, wait_kv_free

pytestmark = pytest.mark.netns

ROUTER_ARGS = ["--max-batch-size", "4", "--num-speculative-tokens", "3"]
SEEDED = 24  # tokens per seeded sampled request
_sampled: dict[str, list[list[int]]] = {}  # seeded outputs per cluster kind, compared across clusters


@pytest.fixture(scope="module", autouse=True)
def _can_make_namespaces():
    why = netns.unavailable()
    if why:
        pytest.skip(why)


@contextlib.contextmanager
def running(log_dir, **kwargs):
    """A NetnsCluster; on exit: no shm segment in any service's own /dev/shm, every process exited 0, and no
    namespace, veth or process of ours left."""
    c = netns.NetnsCluster(log_dir=str(log_dir), target=TARGET, draft=DRAFT, **kwargs)
    veths_before = _root_veths()
    c.start()
    net, pids = c.net, [p.pid for p in c.procs.values()]
    try:
        yield c
        for role in ("drafter", "verifier"):
            assert c.shm_segments(role) == [], f"{role} left shared-memory segments"
    finally:
        codes = c.stop()
    assert all(code == 0 for code in codes.values()), f"unclean exit {codes}; logs in {log_dir}"
    assert net.leftovers() == [], "namespaces left behind"
    assert _root_veths() == veths_before, "a veth appeared in the root namespace"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} still runs"


def _root_veths() -> list[str]:
    return sorted(subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True,
                                 timeout=10).stdout.splitlines())


def greedy_requests(prompt_ids):
    return [gpb.GenerateRequest(prompt_ids=gpb.TokenIds(ids=ids), max_new_tokens=n)
            for ids, n in zip(prompt_ids, BUDGETS)]


def seeded_requests():
    return [gpb.GenerateRequest(prompt=chat(p), max_new_tokens=SEEDED, ignore_eos=True,
                                sampling=common_pb2.SamplingOptions(temperature=0.9, top_p=0.95, seed=100 + i))
            for i, p in enumerate(PROMPTS)]


def check_inline(cluster, metadata=None, log_from: int = 0) -> None:
    info = netns.router_info(cluster, metadata)
    lanes = [r for r in info.replicas if r.role == "verifier"]
    assert [r.transport for r in lanes] == ["inline"], info
    assert lanes[0].drafter == cluster.dialled("drafter")
    log = cluster.log("router")[log_from:]
    # the probe was made (same kernel, same boot id) and failed: the verifier cannot open the drafter's segment
    assert "transport shm unavailable between" in log, log[-3000:]
    assert "(transport inline)" in log


def check_greedy(cluster, prompt_ids, expected, metadata=None) -> None:
    out, _, last = netns.stream_all(cluster, greedy_requests(prompt_ids), metadata=metadata)
    for i, toks in enumerate(out):
        assert toks == expected[i], f"prompt {i} differs from target-only decoding"
    assert sum(m.speculation.drafted_tokens for m in last) > 0  # the drafter took part, across hosts
    wait_kv_free(cluster, timeout_s=15.0)


def check_seeded(cluster, kind: str, metadata=None) -> None:
    reqs = seeded_requests()
    together, _, _ = netns.stream_all(cluster, reqs, metadata=metadata)
    again, _, _ = netns.stream_all(cluster, reqs, metadata=metadata)
    alone = [netns.stream_all(cluster, [r], metadata=metadata)[0][0] for r in reqs[:2]]
    assert together == again, "seeded requests differ between two runs"
    assert alone == together[:2], "seeded requests differ when sent alone"
    assert all(len(t) == SEEDED for t in together)
    _sampled[kind] = together
    if kind != "plain" and "plain" in _sampled:
        assert together == _sampled["plain"], f"seeded requests over {kind} differ from plaintext"
    wait_kv_free(cluster, timeout_s=15.0)


# ---- the harness itself: the fault proxy on tiny sockets (no services) --------------------------------------------
@pytest.fixture
def echo_net():
    """Hosts a, b, h; an echo server on b (a thread of ours, its socket in b's namespace), a relay on h to it."""
    import socket
    import threading

    with netns.Network(["a", "b", "h"]) as net:
        with netns.in_netns(net.ns("b")):
            srv = socket.socket()
        srv.bind((net.addresses["b"], 7000))
        srv.listen(8)
        srv.settimeout(0.5)
        stop = threading.Event()

        def echo(c):
            c.settimeout(0.5)
            while not stop.is_set():
                try:
                    d = c.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not d:
                    break
                c.sendall(d)
            c.close()

        def accept():
            while not stop.is_set():
                try:
                    threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
                except (socket.timeout, OSError):
                    continue

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        relay = netns.Relay("echo", (net.addresses["h"], 7000), (net.addresses["b"], 7000), listen_ns=net.ns("h"),
                            upstream_ns=net.ns("h"))

        def client():
            with netns.in_netns(net.ns("a")):
                c = socket.socket()
            c.settimeout(5)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.connect((net.addresses["h"], 7000))
            return c

        try:
            yield net, relay, client
        finally:
            relay.close()
            stop.set()
            t.join(5)
            srv.close()
    assert net.leftovers() == []


def _rtt_ms(c, n: int = 50) -> float:
    import statistics
    import time

    out = []
    for _ in range(n):
        t = time.perf_counter()
        c.sendall(b"x")
        assert c.recv(16) == b"x"
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def test_relay_latency_stall_blackhole_reset_and_link_down(echo_net):
    import socket
    import time

    net, relay, client = echo_net
    c = client()
    base = _rtt_ms(c)
    relay.set_rtt(0.010)
    assert 10 <= _rtt_ms(c, 20) - base < 15  # a 10 ms delay line (within a few ms of scheduling noise)
    relay.set_rtt(0)
    big = bytes(range(256)) * 4096  # 1 MiB arrives whole and in order through the delay line
    relay.set_rtt(0.002)
    c.sendall(big)
    got = b""
    while len(got) < len(big):
        got += c.recv(1 << 20)
    assert got == big
    relay.set_rtt(0)
    relay.stall(1.0)
    t = time.monotonic()
    c.sendall(b"s")
    assert c.recv(16) == b"s" and time.monotonic() - t >= 0.95  # held, then delivered
    assert relay.blackhole() == 1
    c.sendall(b"q")
    with pytest.raises(socket.timeout):
        c.settimeout(1.0)
        c.recv(16)
    c2 = client()  # a new connection passes
    c2.sendall(b"n")
    assert c2.recv(16) == b"n"
    assert relay.reset() == 2
    with pytest.raises(ConnectionResetError):
        c2.recv(16)
    net.link("b", False)  # b's cable is pulled: the relay cannot reach it and resets its client
    c3 = client()
    with pytest.raises(ConnectionResetError):
        c3.sendall(b"k")
        c3.recv(16)
    net.link("b", True)
    c4 = client()
    c4.sendall(b"u")
    assert c4.recv(16) == b"u"
    for s in (c, c2, c3, c4):
        s.close()


def test_network_leaves_nothing_when_a_test_fails():
    """Namespaces go even when the body raises; a namespace a dead process left is swept by the next Network."""
    with pytest.raises(RuntimeError):
        with netns.Network(["x"]) as net:
            assert net.leftovers()
            raise RuntimeError("a failing test")
    assert net.leftovers() == []
    stale = "mdnt999999999-1-x"  # no such pid
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        assert stale in netns.sweep_stale()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=10)


# ---- plaintext between the hosts ----------------------------------------------------------------------------------
class TestAcrossHosts:
    @pytest.fixture(scope="class")
    @staticmethod
    def cluster(tmp_path_factory):
        with running(tmp_path_factory.mktemp("netns-plain"), mode="psd", router_args=ROUTER_ARGS) as c:
            yield c

    def test_each_service_is_a_host_of_its_own(self, cluster):
        ours = {k: os.readlink(f"/proc/self/ns/{k}") for k in ("net", "ipc", "mnt")}
        seen = [ours] + [cluster.namespaces_of(r) for r in ("router", "drafter", "verifier")]
        for kind in ("net", "ipc", "mnt"):
            assert len({s[kind] for s in seen}) == 4, f"two processes share a {kind} namespace: {seen}"
        shm = {os.stat(f"/proc/{cluster.procs[r].pid}/root/dev/shm").st_dev for r in ("drafter", "verifier")}
        assert len(shm | {os.stat("/dev/shm").st_dev}) == 3, "a /dev/shm is shared"

    def test_router_negotiates_inline(self, cluster):
        check_inline(cluster)

    def test_greedy_equals_target_only(self, cluster, prompt_ids, expected):
        check_greedy(cluster, prompt_ids, expected)

    def test_seeded_sampling_is_reproducible(self, cluster):
        check_seeded(cluster, "plain")
        greedy, _, _ = netns.stream_all(cluster, [gpb.GenerateRequest(prompt=chat(PROMPTS[0]),
                                                                      max_new_tokens=SEEDED, ignore_eos=True)])
        assert _sampled["plain"][0] != greedy[0], "sampling made no difference"

    def test_greedy_in_auto_mode(self, cluster, prompt_ids, expected):
        """The default mode: schedule and k chosen per tick from the measured costs (here including the links)."""
        log_from = len(cluster.log("router"))
        cluster.replace_router("auto", ["--max-batch-size", "4", "--max-speculative-tokens", "6"])
        check_inline(cluster, log_from=log_from)
        check_greedy(cluster, prompt_ids, expected)


# ---- TLS and mutual TLS between the hosts -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    d = tmp_path_factory.mktemp("netns-pki")
    # The hosts' addresses are fixed (each network is its own L2 segment): the certificates can name them up front.
    return netns.make_pki(d, [f"{netns.SUBNET}.2", f"{netns.SUBNET}.3"], f"{netns.SUBNET}.1")


class TestTLSAcrossHosts:
    @pytest.fixture(scope="class", params=["tls", "mtls"])
    @staticmethod
    def cluster(request, pki, tmp_path_factory):
        mutual = request.param == "mtls"
        tls = netns.HostTLS(str(pki["ca"]), str(pki["service"]), str(pki["service-key"]),
                            *((str(pki["router-client"]), str(pki["router-client-key"])) if mutual else ()))
        public = (str(pki["router"]), str(pki["router-key"])) if mutual else None
        with running(tmp_path_factory.mktemp(f"netns-{request.param}"), mode="psd", router_args=ROUTER_ARGS,
                     tls=tls, public_tls=public) as c:
            c.kind = request.param
            yield c

    def test_inline_greedy_and_seeded_over_tls(self, cluster, prompt_ids, expected):
        want = "(mTLS)" if cluster.kind == "mtls" else "(TLS)"
        assert all(want in cluster.log(r) for r in ("drafter", "verifier"))
        check_inline(cluster)
        check_greedy(cluster, prompt_ids, expected)
        check_seeded(cluster, cluster.kind)

    def test_services_refuse_clients_without_the_right_credentials(self, cluster, pki):
        """Through the harness host, i.e. from another host: plaintext never gets an answer; under mTLS neither does
        TLS without a client certificate."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        def health(creds):
            address = cluster.service_address("verifier")
            ch = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
            try:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            finally:
                ch.close()

        ca = pki["ca"].read_bytes()
        with pytest.raises(grpc.RpcError):
            health(None)
        if cluster.kind == "mtls":
            with pytest.raises(grpc.RpcError):
                health(grpc.ssl_channel_credentials(ca))
        assert health(cluster.credentials("verifier")) == health_pb2.HealthCheckResponse.SERVING
