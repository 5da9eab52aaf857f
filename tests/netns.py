"""Several "hosts" on one machine, for real: network namespaces joined by veth pairs, and a fault-injecting TCP proxy.

Why: the card says draft probabilities travel inline when drafter and verifier are on different hosts, and that a
lost link costs time, not requests. Loopback tests cannot show either: every process there shares one /dev/shm (so
shm is always negotiated) and loopback never drops, delays or resets anything. Here each service runs on a host of
its own:

    router 10.77.0.1      drafter 10.77.0.2      verifier 10.77.0.3      harness 10.77.0.10
         |eth0                 |eth0                  |eth0                    |eth0
         +--------p-router-----+----p-drafter---------+----p-verifier----------+----p-harness  bridge br0 in the
                                                                                                "switch" namespace

- every host is a network namespace (`ip netns`) with one veth pair to a bridge in a switch namespace, so the hosts
  share one L2 segment like servers in a rack, and one host's cable (its switch port) can be pulled without touching
  the others (`Network.link`);
- every service process also gets its own IPC and mount namespace with a fresh tmpfs on /dev/shm (`unshare`), so a
  shared-memory segment one service makes is invisible to the others, as on separate machines;
- no veth end and no address is ever in the machine's own (root) namespace: the only way in is through the harness's
  TCP relays (`Relay`), whose listening socket is on the test process's loopback and whose upstream socket is made
  inside the harness host (a thread may enter another network namespace with setns(2), and a socket belongs to the
  namespace it was created in). So the test process talks to the router, and watches the services' health, without
  any route between the machine and the namespaces: all traffic stays inside what we create.

The fault proxy (`Relay` with faults) is the same relay placed between the router and each model service (router ->
harness:port -> service): this kernel has no netem qdisc, so added latency (a delay line per direction), stalls
(data held, then delivered in order), black holes (existing connections swallow everything; new ones pass) and
resets (RST on both sides) are made in user space. Link failures are real (`ip link set ... down`).

Nothing is left behind whatever happens: `Network.close` kills every process left in our namespaces, deletes the
namespaces (which destroys their veths), and runs from context managers, test finalizers and atexit; the services
get PR_SET_PDEATHSIG (MINEDRAFT_PARENT_PID), so they die with a test process that is SIGKILLed; and namespaces left
by a dead test process (their names carry its pid) are swept when the next one starts. Every wait is bounded.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "mdnt"  # namespace names: mdnt<pid of the creating process>-<n>-<host>
SUBNET = "10.77.0"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()} (exit {r.returncode})")
    return r


# ---- can we? --------------------------------------------------------------------------------------------------------
_UNAVAILABLE: list[str | None] = []


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can). Tried for real once per process: a namespace, a bridge,
    a veth pair, and a process with its own IPC namespace and /dev/shm; everything is removed again."""
    if _UNAVAILABLE:
        return _UNAVAILABLE[0]
    why = None
    if not sys.platform.startswith("linux"):
        why = "network namespaces need Linux"
    elif os.geteuid() != 0:
        why = "network namespaces need root (run as root, e.g. in CI)"
    else:
        missing = [t for t in ("ip", "unshare", "mount") if shutil.which(t) is None]
        if missing:
            why = f"missing {', '.join(missing)} (apt-get install iproute2 util-linux)"
    if why is None:
        try:
            with Network(["a", "b"], tag="probe") as net:
                out = net.run_in("a", "sh", "-c", "readlink /proc/self/ns/ipc; ls -A /dev/shm | wc -l")
                if out.split()[0] == os.readlink("/proc/self/ns/ipc"):
                    why = "unshare --ipc did not give a process its own IPC namespace"
                with in_netns(net.ns("a")):
                    socket.socket().close()
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is the reason to skip
            why = f"cannot make network namespaces here: {exc}"
    _UNAVAILABLE.append(why)
    return why


# ---- entering a namespace from a thread -----------------------------------------------------------------------------
@contextlib.contextmanager
def in_netns(name: str | None):
    """Run the body with this thread in network namespace `name` (None: stay). Sockets created in the body belong to
    that namespace for life, wherever they are used from; other threads are not affected."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # a thread stuck in the wrong namespace would be a silent mess
                os._exit(70)
    finally:
        os.close(own)


# ---- the network ----------------------------------------------------------------------------------------------------
_LIVE: set["Network"] = set()


def _close_all_at_exit() -> None:
    for net in list(_LIVE):
        net.close()


atexit.register(_close_all_at_exit)


def sweep_stale() -> list[str]:
    """Delete namespaces a dead test process left (SIGKILLed before it could clean up), and what runs in them."""
    removed = []
    r = _run("ip", "netns", "list", check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its creator still runs: not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_ns_pids(name)
        _run("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed


def _kill_ns_pids(name: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [int(p) for p in _run("ip", "netns", "pids", name, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


class Network:
    """Hosts on one switch. `hosts` are names; host i gets SUBNET.(i+1) unless `addresses` says otherwise.

    Use as a context manager (or call close()): everything it made goes, whatever happened."""

    _count = 0  # networks made by this process: part of the names, so two may exist at once

    def __init__(self, hosts: list[str], addresses: dict[str, str] | None = None, tag: str = ""):
        sweep_stale()
        Network._count += 1
        self.prefix = f"{PREFIX}{os.getpid()}-{tag or Network._count}-"
        self.hosts = list(hosts)
        self.addresses = {h: (addresses or {}).get(h, f"{SUBNET}.{i + 1}") for i, h in enumerate(hosts)}
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []
        _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, host: str) -> str:
        return self.prefix + host

    @property
    def switch(self) -> str:
        return self.prefix + "switch"

    def port(self, host: str) -> str:
        """The switch-side end of `host`'s cable."""
        return f"p-{host}"[:15]

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for h in self.hosts:
            self._add_ns(self.ns(h))
            _run("ip", "-n", self.switch, "link", "add", self.port(h), "type", "veth", "peer", "name", "eth0",
                 "netns", self.ns(h))
            _run("ip", "-n", self.switch, "link", "set", self.port(h), "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", self.port(h), "up")
            _run("ip", "-n", self.ns(h), "addr", "add", f"{self.addresses[h]}/24", "dev", "eth0")
            _run("ip", "-n", self.ns(h), "link", "set", "eth0", "up")

    def link(self, host: str, up: bool) -> None:
        """Pull (or plug back) `host`'s cable: its switch port goes down, so nothing reaches it or leaves it (its own
        interface shows NO-CARRIER and keeps its address, as a server whose cable is cut)."""
        _run("ip", "-n", self.switch, "link", "set", self.port(host), "up" if up else "down")

    def run_in(self, host: str, *argv: str, timeout: float = 20.0) -> str:
        """A short command on `host`, in its own IPC and mount namespace (own /dev/shm); returns its stdout."""
        return _run(*self._wrap(host, list(argv)), timeout=timeout).stdout

    def _wrap(self, host: str, argv: list[str]) -> list[str]:
        # ip netns exec and unshare exec() (no fork), and sh exec()s the command: the Popen pid is the command's, and
        # its parent is us (what die_with_parent checks).
        return ["ip", "netns", "exec", self.ns(host), "unshare", "--ipc", "--mount", "--propagation", "private", "--",
                "sh", "-c", 'mount -t tmpfs -o size=256m,mode=1777 minedraft-shm /dev/shm && exec "$@"', "sh", *argv]

    def spawn(self, host: str, argv: list[str], log_path: str | Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a long-running process on `host` (own IPC namespace and /dev/shm), logging to `log_path`."""
        env = dict(os.environ, **(env or {}))
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            p = subprocess.Popen(self._wrap(host, argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        finally:
            if log_path:
                out.close()
        self.procs.append(p)
        return p

    def close(self) -> None:
        """Kill what still runs in our namespaces and delete them (their veths go with them). Idempotent."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        self.procs = []
        for name in reversed(self.made):
            _kill_ns_pids(name)
            _run("ip", "netns", "del", name, check=False)
        self.made = []
        _LIVE.discard(self)

    def leftovers(self) -> list[str]:
        """Our namespaces that still exist (should be none after close)."""
        out = _run("ip", "netns", "list", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.prefix)]

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the relay and fault proxy --------------------------------------------------------------------------------------
_IO_TIMEOUT_S = 0.5  # every blocking socket call wakes at least this often to see whether it should stop


class _Conn:
    """One relayed connection: two sockets and, per direction, a reader and a writer thread joined by a delay line.

    With no fault active and nothing queued, the reader sends what it read itself (one thread hop less: the relay
    adds ~0.1 ms instead of ~0.4 ms to a round trip); otherwise bytes wait in the line until they are due."""

    def __init__(self, relay: "Relay", down: socket.socket, up: socket.socket):
        self.relay, self.socks = relay, (down, up)
        self.dead = False  # aborted (reset, error, relay closed) or done: threads leave, the last one closes
        self.blackholed = False  # everything read is swallowed from now on
        self.conds = (threading.Condition(), threading.Condition())  # per direction: its line and its sends
        self.queues = (deque(), deque())  # direction 0: down -> up, 1: up -> down; items (due, bytes | None = EOF)
        self._count = threading.Lock()
        self.live_threads = 4
        self.ended = [False, False]

    def start(self) -> None:
        for d in (0, 1):
            for fn in (self._reader, self._writer):
                threading.Thread(target=self._guarded, args=(fn, d), daemon=True,
                                 name=f"relay-{self.relay.name}-{fn.__name__}-{d}").start()

    def _guarded(self, fn, d: int) -> None:
        try:
            fn(d)
        except OSError:
            self.abort()
        finally:
            with self._count:
                self.live_threads -= 1
                last = self.live_threads == 0
            if last:
                for s in self.socks:
                    with contextlib.suppress(OSError):
                        s.close()
                self.relay._forget(self)

    def _notify_all(self) -> None:
        for c in self.conds:
            with c:
                c.notify_all()

    def abort(self) -> None:
        """Reset both sides: RST (zero linger) once the threads are out; readers are woken at once."""
        if self.dead:
            return
        self.dead = True
        self._notify_all()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)  # wakes a reader blocked in recv without sending anything

    def _send(self, dst: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.dead:
            try:
                n = dst.send(view)
            except socket.timeout:
                continue
            view = view[n:]

    def _eof(self, d: int) -> None:
        """Direction d ended cleanly: pass the FIN on; when both have, the connection is done."""
        with contextlib.suppress(OSError):
            self.socks[1 - d].shutdown(socket.SHUT_WR)
        self.ended[d] = True
        if all(self.ended):
            self.dead = True
            self._notify_all()

    def _reader(self, d: int) -> None:
        src, dst, q, cond, relay = self.socks[d], self.socks[1 - d], self.queues[d], self.conds[d], self.relay
        while not self.dead:
            try:
                data = src.recv(1 << 18)
            except socket.timeout:
                continue
            except OSError:
                self.abort()  # the peer reset us (or we were aborted): pass the reset on
                return
            if self.dead:
                return
            with cond:
                if not q and not relay.one_way_s and time.monotonic() >= relay.stalled_until:
                    if not data:
                        self._eof(d)
                        return
                    if not self.blackholed:
                        self._send(dst, data)  # the writer is idle (its line is empty) and stays so: we hold it
                    continue
                q.append((time.monotonic() + relay.one_way_s, data or None))
                cond.notify_all()
            if not data:
                return

    def _writer(self, d: int) -> None:
        dst, q, cond, relay = self.socks[1 - d], self.queues[d], self.conds[d], self.relay
        while True:
            with cond:
                while not q and not self.dead:
                    cond.wait(_IO_TIMEOUT_S)
                if self.dead:
                    return
                due, data = q[0]
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)  # nanosleep: sub-millisecond delays stay sub-millisecond
            while not self.dead and time.monotonic() < relay.stalled_until:
                time.sleep(min(0.02, max(relay.stalled_until - time.monotonic(), 0.001)))
            with cond:  # popped only once sent: an empty line means an idle writer (the reader's direct path)
                if self.dead:
                    return
                if data is None:
                    q.popleft()
                    self._eof(d)
                    return
                if not self.blackholed:
                    self._send(dst, data)
                q.popleft()


class Relay:
    """A TCP relay from `listen` (a socket made in namespace `listen_ns`, None = ours) to `upstream` (dialled from a
    socket made in `upstream_ns`), with faults a test can switch at any time:

    - `set_rtt(s)`: every byte is delivered s/2 later in each direction (a delay line: throughput is not capped, the
      pipe just gets longer), so a request/answer pays s more;
    - `stall(s)`: nothing is delivered for s seconds, on every connection, old or new; then everything, in order;
    - `blackhole()`: the connections open now swallow all they get from then on (as a middlebox that lost its state
      and drops their packets), while new connections work;
    - `reset()`: every open connection is reset (RST to both sides).
    """

    def __init__(self, name: str, listen: tuple[str, int], upstream: tuple[str, int], listen_ns: str | None = None,
                 upstream_ns: str | None = None, connect_timeout_s: float = 2.0):
        self.name, self.upstream, self.upstream_ns = name, upstream, upstream_ns
        self.connect_timeout_s = connect_timeout_s
        self.one_way_s = 0.0
        self.stalled_until = 0.0
        self.accepted = 0
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._closed = False
        with in_netns(listen_ns):
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(listen)
        self._sock.listen(64)
        self._sock.settimeout(_IO_TIMEOUT_S)
        self.address = self._sock.getsockname()
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"relay-{name}-accept")
        self._thread.start()

    @property
    def port(self) -> int:
        return self.address[1]

    # ---- faults ---------------------------------------------------------------------------------------------------
    def set_rtt(self, rtt_s: float) -> None:
        self.one_way_s = rtt_s / 2

    def stall(self, seconds: float) -> None:
        self.stalled_until = time.monotonic() + seconds

    def blackhole(self) -> int:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.blackholed = True
        return len(conns)

    def reset(self) -> int:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.abort()
        return len(conns)

    def clear(self) -> None:
        """No latency, no stall; black-holed connections are reset (their peers would wait on them forever)."""
        self.one_way_s, self.stalled_until = 0.0, 0.0
        with self._lock:
            conns = [c for c in self._conns if c.blackholed]
        for c in conns:
            c.abort()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # ---- plumbing -------------------------------------------------------------------------------------------------
    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._open, args=(down,), daemon=True, name=f"relay-{self.name}-open").start()

    def _open(self, down: socket.socket) -> None:
        """Dial upstream for one accepted connection; if that fails (link down), reset the client, as a router
        answering for an unreachable host would."""
        with in_netns(self.upstream_ns):
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.settimeout(self.connect_timeout_s)
        try:
            up.connect(self.upstream)
        except OSError:
            up.close()
            with contextlib.suppress(OSError):
                down.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            down.close()
            return
        for s in (down, up):
            s.settimeout(_IO_TIMEOUT_S)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(self, down, up)
        with self._lock:
            if self._closed:
                conn.dead = True
            self._conns.add(conn)
        conn.live_threads = 4
        conn.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop listening, reset every connection, and wait (bounded) until all their threads are out."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(timeout_s)
        self.reset()
        deadline = time.monotonic() + timeout_s
        while self.connections and time.monotonic() < deadline:
            time.sleep(0.02)

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- the three services on three hosts ------------------------------------------------------------------------------
@dataclass
class HostTLS:
    """PEM files for TLS between hosts: the services' certificates name their host's IP (what the router dials) and
    127.0.0.1 (what the harness's relays are dialled on); with `client_cert`, mutual TLS."""

    ca: str
    service_cert: str
    service_key: str
    client_cert: str = ""
    client_key: str = ""


@dataclass
class NetnsCluster:
    """Verifier, drafter and router, each on its own host (see the module docstring), started as `minedraft up` starts
    them (`python -m services.<role>`), with the harness host in between:

    - `via_proxy`: the router dials the model services through a fault `Relay` each (router -> harness -> service);
      otherwise it dials their addresses directly across the switch;
    - the test process reaches the router's public API through `address` (a relay: our loopback -> harness host ->
      router) and each service directly through `service_address(role)` (health, GetModelInfo).
    """

    log_dir: str
    mode: str = "psd"
    via_proxy: bool = False
    router_args: list[str] = field(default_factory=list)
    service_args: list[str] = field(default_factory=list)
    tls: HostTLS | None = None
    public_tls: tuple[str, str] | None = None  # (cert, key) for the router's public API
    target: str = ""
    draft: str = ""
    drain_timeout_s: float = 10.0
    net: Network | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    proxies: dict[str, Relay] = field(default_factory=dict)
    relays: dict[str, Relay] = field(default_factory=dict)

    HOSTS = ("router", "drafter", "verifier", "harness")
    PORTS = {"router": 50051, "drafter": 50061, "verifier": 50062}

    def ip(self, host: str) -> str:
        return self.net.addresses[host]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.relays['router'].port}"

    def service_address(self, role: str) -> str:
        return f"127.0.0.1:{self.relays[role].port}"

    def dialled(self, role: str, via_proxy: bool | None = None) -> str:
        """The address the router dials for `role` (through the fault proxy, or straight across the switch)."""
        if self.via_proxy if via_proxy is None else via_proxy:
            return f"{self.ip('harness')}:{self.PORTS[role]}"
        return f"{self.ip(role)}:{self.PORTS[role]}"

    def _router_base(self) -> list[str]:
        router_tls = []
        if self.tls:
            router_tls = ["--internal-ca", self.tls.ca]
            if self.tls.client_cert:
                router_tls += ["--internal-cert", self.tls.client_cert, "--internal-key", self.tls.client_key]
        if self.public_tls:
            router_tls += ["--tls-cert", self.public_tls[0], "--tls-key", self.public_tls[1]]
        return ["--host", self.ip("router"), "--port", str(self.PORTS["router"]),
                "--verifiers", self.dialled("verifier"), "--drafters", self.dialled("drafter"),
                "--drain-timeout-s", str(self.drain_timeout_s),
                *(["--tokenizer", self.target] if self.target else []), *router_tls]

    def _env(self) -> dict[str, str]:
        return {"PYTHONUNBUFFERED": "1", "MINEDRAFT_PARENT_PID": str(os.getpid()),
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    def _spawn(self, role: str, argv: list[str]) -> subprocess.Popen:
        p = self.net.spawn(role, [sys.executable, "-m", f"services.{role}", *argv],
                           log_path=Path(self.log_dir) / f"{role}.log", env=self._env())
        self.procs[role] = p
        return p

    def credentials(self, role: str):
        import grpc

        if role == "router":
            if not self.public_tls:
                return None
            return grpc.ssl_channel_credentials(Path(self.tls.ca).read_bytes())
        if not self.tls:
            return None
        t = self.tls
        return grpc.ssl_channel_credentials(Path(t.ca).read_bytes(),
                                            Path(t.client_key).read_bytes() if t.client_key else None,
                                            Path(t.client_cert).read_bytes() if t.client_cert else None)

    def channel(self, role: str = "router"):
        import grpc

        address = self.address if role == "router" else self.service_address(role)
        creds = self.credentials(role)
        return grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)

    def start(self, timeout_s: float = 180.0) -> "NetnsCluster":
        from minedraft.launcher import wait_serving

        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        self.net = Network(list(self.HOSTS), addresses={"harness": f"{SUBNET}.10"})
        try:
            harness = self.net.ns("harness")
            for role in ("drafter", "verifier"):
                self.relays[role] = Relay(f"watch-{role}", ("127.0.0.1", 0), (self.ip(role), self.PORTS[role]),
                                          upstream_ns=harness)
                if self.via_proxy:
                    self.proxies[role] = Relay(f"proxy-{role}", (self.ip("harness"), self.PORTS[role]),
                                               (self.ip(role), self.PORTS[role]), listen_ns=harness,
                                               upstream_ns=harness)
            self.relays["router"] = Relay("public", ("127.0.0.1", 0), (self.ip("router"), self.PORTS["router"]),
                                          upstream_ns=harness)
            service_tls = []
            if self.tls:
                service_tls = ["--tls-cert", self.tls.service_cert, "--tls-key", self.tls.service_key]
                if self.tls.client_cert:
                    service_tls += ["--client-ca", self.tls.ca]
            for role, model in (("verifier", self.target), ("drafter", self.draft)):
                self._spawn(role, ["--host", self.ip(role), "--port", str(self.PORTS[role]),
                                   *(["--model", model] if model else []), *service_tls, *self.service_args])
            self._spawn("router", [*self._router_base(), "--mode", self.mode, *self.router_args])
            for role in ("verifier", "drafter"):
                wait_serving(self.service_address(role), timeout_s, self.procs[role],
                             credentials=self.credentials(role))
            wait_serving(self.address, timeout_s, self.procs["router"], credentials=self.credentials("router"))
        except BaseException:
            self.stop()
            raise
        return self

    def replace_router(self, mode: str, router_args: list[str], via_proxy: bool | None = None,
                       timeout_s: float = 180.0) -> None:
        """A new router (mode, flags; dialling through the proxies or not) against the same model services: SIGTERM
        the old one (it drains) first."""
        from minedraft.launcher import wait_serving

        old = self.procs.pop("router")
        old.send_signal(signal.SIGTERM)
        old.wait(15 + self.drain_timeout_s)
        self.mode, self.router_args = mode, list(router_args)
        if via_proxy is not None:
            if via_proxy and not self.proxies:
                raise ValueError("this cluster was started without proxies")
            self.via_proxy = via_proxy
        p = self._spawn("router", [*self._router_base(), "--mode", mode, *self.router_args])
        wait_serving(self.address, timeout_s, p, credentials=self.credentials("router"))

    def namespaces_of(self, role: str) -> dict[str, str]:
        """The namespaces `role`'s process runs in: {net, ipc, mnt} -> 'net:[inode]'."""
        pid = self.procs[role].pid
        return {k: os.readlink(f"/proc/{pid}/ns/{k}") for k in ("net", "ipc", "mnt")}

    def shm_segments(self, role: str) -> list[str]:
        """minedraft segments in `role`'s own /dev/shm (seen through /proc/PID/root, i.e. its mount namespace)."""
        d = Path(f"/proc/{self.procs[role].pid}/root/dev/shm")
        return sorted(p.name for p in d.iterdir() if p.name.startswith("minedraft-"))

    def log(self, role: str) -> str:
        return (Path(self.log_dir) / f"{role}.log").read_text(errors="replace")

    def stop(self, timeout_s: float = 15.0) -> dict[str, int]:
        """SIGTERM the router (it drains), then the services; SIGKILL stragglers; then the relays and the network.
        Returns exit codes (negative: killed by that signal)."""
        codes = {}
        try:
            for role in ["router", "drafter", "verifier"]:
                p = self.procs.get(role)
                if p is None:
                    continue
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout_s + (self.drain_timeout_s if role == "router" else 0))
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(5)
                codes[role] = p.returncode
            self.procs.clear()
        finally:
            for r in list(self.proxies.values()) + list(self.relays.values()):
                r.close()
            self.proxies.clear()
            self.relays.clear()
            if self.net is not None:
                self.net.close()
        return codes

    def __enter__(self) -> "NetnsCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- a PKI for the hosts --------------------------------------------------------------------------------------------
def make_pki(d: Path, service_ips: list[str], router_ip: str) -> dict[str, Path]:
    """A throwaway CA (openssl CLI), a certificate for the model services naming their IPs (and 127.0.0.1), one for
    the router's public API, and a client certificate for the router (mTLS)."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", "/CN=netns-ca", "-keyout", "ca.key", "-out", "ca.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    out = {"ca": d / "ca.pem"}
    leaves = {"service": ("serverAuth", service_ips + ["127.0.0.1"]), "router": ("serverAuth", [router_ip, "127.0.0.1"]),
              "router-client": ("clientAuth", [])}
    for name, (usage, ips) in leaves.items():
        san = ",".join(f"IP:{ip}" for ip in ips)
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                       f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
        ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-out", f"{name}.pem", "-extfile", f"{name}.ext")
        out[name], out[f"{name}-key"] = d / f"{name}.pem", d / f"{name}.key"
    return out


# ---- clients --------------------------------------------------------------------------------------------------------
def stream_all(cluster: NetnsCluster, requests: list, during=None, timeout_s: float = 300.0,
               metadata=None) -> tuple[list[list[int]], float, list]:
    """Stream every GenerateRequest at once (a thread each); call `during()` once the first tokens have arrived.
    Returns (token ids per request, seconds from the first submit to the last token, last message per request)."""
    from concurrent.futures import ThreadPoolExecutor

    from minedraft.v1 import generate_pb2_grpc

    channel = cluster.channel()
    stub = generate_pb2_grpc.GenerationStub(channel)
    started = threading.Event()

    def one(req):
        toks, last = [], None
        for m in stub.GenerateStream(req, timeout=timeout_s, metadata=metadata):
            toks.extend(m.token_ids)
            last = m
            started.set()
        return toks, last

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            t0 = time.monotonic()
            futs = [pool.submit(one, r) for r in requests]
            if during is not None:
                started.wait(60)
                during()
            done = [f.result() for f in futs]
            elapsed = time.monotonic() - t0
    finally:
        channel.close()
    return [d[0] for d in done], elapsed, [d[1] for d in done]


def router_info(cluster: NetnsCluster, metadata=None):
    from minedraft.v1 import generate_pb2 as gpb, generate_pb2_grpc

    ch = cluster.channel()
    try:
        return generate_pb2_grpc.GenerationStub(ch).GetInfo(gpb.GetInfoRequest(), timeout=10, metadata=metadata)
    finally:
        ch.close()
