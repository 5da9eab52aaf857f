"""A producer killed anywhere inside a shared-memory export leaves nothing the sweep cannot remove.

The segment's name says who made it (pid, process start time, pid namespace), so the sweep judges a segment by its
name alone: one killed right after it was created (empty, no header yet), after sizing, after the header, after the
payload, or after it was closed, all go. A live producer's segments stay. Each case runs a real exporter in a child
process that SIGKILLs itself right after the chosen system call of the export returns.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from minedraft.runtime.transport import TensorExporter, leftover_segments, sweep_orphans

CHILD = r"""
import os, signal, sys
import torch
from minedraft.runtime import transport

fn, nth = sys.argv[1], int(sys.argv[2])
exporter = transport.TensorExporter(sys.argv[3])
real, calls = getattr(os, fn), [0]

def trap(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

setattr(os, fn, trap)
exporter.export(torch.arange(4096, dtype=torch.float32), "shm")
print("export finished without being killed", flush=True)
"""

# (system call, which call of it): the export's steps in order
POINTS = [("open", 1), ("ftruncate", 1), ("pwrite", 1), ("pwrite", 2), ("close", 1)]


@pytest.mark.parametrize("fn, nth", POINTS, ids=[f"after-{f}-{n}" for f, n in POINTS])
def test_producer_killed_inside_export_leaves_nothing(fn, nth):
    instance = f"{abs(hash((fn, nth))) % (1 << 48):012x}"
    child = subprocess.run([sys.executable, "-c", CHILD, fn, str(nth), instance], capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    left = leftover_segments(instance)
    assert len(left) == 1, left  # the half-made (or finished, unannounced) segment is there ...
    assert sweep_orphans() == left  # ... and the sweep knows whose it is
    assert not leftover_segments(instance)


def test_sweep_spares_live_producers_and_can_be_limited_to_given_pids():
    exporter = TensorExporter("fedcba987654")
    ref = exporter.export(torch.ones(8), "shm")
    try:
        assert ref.shm.name not in sweep_orphans()  # its creator (us) is alive
        assert ref.shm.name in leftover_segments(exporter.instance_id)
    finally:
        exporter.release_all()
    child = subprocess.run([sys.executable, "-c", CHILD, "close", "1", "abcdefabcdef"], capture_output=True,
                           timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert sweep_orphans(only_pids={1}) == []  # not that child's: left alone
    assert len(sweep_orphans(only_pids=None)) == 1
    assert not leftover_segments("abcdefabcdef")
