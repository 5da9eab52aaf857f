"""Which path draft probabilities take from the drafter to the verifier, decided by trying, not by configuration:
the drafter makes a probe buffer, the verifier opens it, and the digests must agree. Same boot id is only a hint;
two containers on one host may not share /dev/shm, and the probe finds that out."""

from __future__ import annotations

import logging

from minedraft.v1 import model_service_pb2 as pb
from services.router.clients import ModelClient

log = logging.getLogger(__name__)


async def _probe(drafter: ModelClient, verifier: ModelClient, kind: str) -> str | None:
    made = await drafter.probe(pb.ProbeRequest(create=kind))
    if made.error:
        return made.error
    try:
        opened = await verifier.probe(pb.ProbeRequest(open=made.ref))
    finally:
        name = made.ref.shm.name or made.ref.cuda_ipc.name
        await drafter.probe(pb.ProbeRequest(release=name))
    if opened.error:
        return opened.error
    return None if opened.digest == made.digest else "digest mismatch"


async def negotiate(drafter: ModelClient, verifier: ModelClient, preference: str = "auto") -> str:
    if preference not in ("auto", "inline", "shm", "cuda_ipc"):
        raise ValueError(f"unknown transport {preference!r}")
    if preference == "inline":
        return "inline"
    d, v = drafter.info, verifier.info
    candidates = [preference] if preference != "auto" else []
    if preference == "auto" and d.host_id == v.host_id:
        if d.device.startswith("cuda") and v.device.startswith("cuda"):
            candidates.append("cuda_ipc")
        candidates.append("shm")
    for kind in candidates:
        why = await _probe(drafter, verifier, kind)
        if why is None:
            log.debug("transport %s <-> %s: %s", drafter.address, verifier.address, kind)
            return kind
        log.info("transport %s unavailable between %s and %s: %s", kind, drafter.address, verifier.address, why)
        if preference != "auto":
            raise RuntimeError(f"transport {preference} was requested but does not work: {why}")
    log.debug("transport %s <-> %s: inline", drafter.address, verifier.address)
    return "inline"
