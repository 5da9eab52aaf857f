"""Keeping a local cluster up: `minedraft up` runs its three processes under this supervisor.

A model service that exits (a crash, kill -9, the OOM killer) is started again on the same port with the same flags.
The router holds every request's tokens, so its requests survive: without the drafter a lane decodes target-only
until the drafter is back, and without the verifier it waits for it (up to the router's --rpc-timeout-s) and
re-prefills. A router that exits is restarted too; its in-flight calls end (clients see UNAVAILABLE and retry), and
the model services free what its sessions held.

Restarts back off (1 s, 2 s, 4 s, ... up to `max_backoff_s`); a process that exits more than `max_restarts` times
within `window_s` is given up on loudly, and everything is stopped: a crash loop is a configuration problem that
restarting cannot fix.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from minedraft.launcher import Cluster


@dataclass
class RestartPolicy:
    max_restarts: int = 5  # restarts allowed per process within window_s ...
    window_s: float = 300.0  # ... beyond which the supervisor gives up
    backoff_s: float = 1.0  # delay before the first restart in the window; doubled for each later one
    max_backoff_s: float = 30.0
    ready_timeout_s: float = 300.0  # a restarted process must report SERVING within this

    def delay(self, recent: int) -> float:
        """Seconds to wait before a restart, given how many restarts of the process fall in the window already."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** recent)


class GiveUp(RuntimeError):
    """A process kept exiting: the supervisor stopped everything."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Supervisor:
    cluster: Cluster
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    log: Callable[[str], None] = print
    restarts: dict[str, deque] = field(default_factory=dict)  # role -> times of its recent restarts

    def check(self) -> list[str]:
        """Restart every process that has exited since the last check; returns the roles restarted. Raises GiveUp
        (after stopping the cluster) when one exits too often."""
        restarted = []
        for role, code in sorted(self.cluster.exited().items(), key=lambda rc: rc[0] != "verifier"):
            now = time.monotonic()
            recent = self.restarts.setdefault(role, deque())
            while recent and now - recent[0] > self.policy.window_s:
                recent.popleft()
            if len(recent) >= self.policy.max_restarts:
                self.log(f"{role} exited ({describe_exit(code)}) {len(recent) + 1} times within "
                         f"{self.policy.window_s:.0f} s; giving up: stopping everything (see its log)")
                self.cluster.stop()
                raise GiveUp(f"{role} keeps exiting ({describe_exit(code)})")
            delay = self.policy.delay(len(recent))
            self.log(f"{role} exited ({describe_exit(code)}); restarting in {delay:.0f} s "
                     f"(restart {len(recent) + 1} of at most {self.policy.max_restarts} in "
                     f"{self.policy.window_s:.0f} s)")
            time.sleep(delay)
            recent.append(time.monotonic())
            t = time.monotonic()
            try:
                self.cluster.restart(role, timeout_s=self.policy.ready_timeout_s)
            except (RuntimeError, TimeoutError) as exc:  # it died again while starting: the next check counts it
                self.log(f"{role} did not come back: {exc}")
                continue
            self.log(f"{role} back in {time.monotonic() - t:.1f} s (pid {self.cluster.procs[role].pid})")
            restarted.append(role)
        return restarted

    def run(self, every_s: float = 0.5) -> None:
        """Supervise until interrupted (KeyboardInterrupt) or GiveUp."""
        while True:
            self.check()
            time.sleep(every_s)
