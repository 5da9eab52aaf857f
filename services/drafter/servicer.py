"""Drafter: proposes k tokens per sequence with the small model. Ships draft probabilities (for sampled requests) by
the transport the router negotiated; keeps ownership of those buffers until the router reports them consumed."""

from __future__ import annotations

import time

from minedraft.runtime.sampling import SparseProbs
from minedraft.runtime.speculative import DraftRequest, propose
from minedraft.v1 import model_service_pb2 as pb, model_service_pb2_grpc as pb_grpc
from services.model_service import ModelService


class DrafterService(ModelService):
    role = "drafter"
    generator_salt = 1  # the draft's random stream must differ from the target's
    work_kind, response_cls = "propose", pb.DrafterResponse
    grpc_service = pb.DESCRIPTOR.services_by_name["Drafter"].full_name

    def add_to_server(self, server) -> None:
        pb_grpc.add_DrafterServicer_to_server(self, server)

    def work(self, batch: pb.ProposeBatch, owned: set[str]) -> pb.ProposeResult:
        t = time.perf_counter()
        reqs = []
        for s in batch.seqs:
            if s.k < 0:
                raise ValueError(f"sequence {s.seq_id!r}: negative draft length")
            if not 0.0 <= s.min_confidence <= 1.0:  # NaN fails too
                raise ValueError(f"sequence {s.seq_id!r}: min_confidence must be in [0, 1], got {s.min_confidence}")
            params, gen = self.seq_state(s.seq_id, s.start, s.sampling, owned)
            reqs.append(DraftRequest(s.seq_id, s.start, list(s.tokens), s.k, params, gen, s.min_confidence))
        drafts = propose(self.runner, reqs)
        out, rows, row = pb.ProposeResult(), [], 0
        for s, d in zip(batch.seqs, drafts):
            probs_row = -1
            if d.probs is not None:
                probs_row, row = row, row + len(d.tokens)
                rows.append(d.probs)
            out.seqs.add(seq_id=s.seq_id, tokens=d.tokens, probs_row=probs_row)
        if rows:  # one buffer for the batch: int32 [rows, 2, S] (sampling.SparseProbs.pack)
            out.probs.CopyFrom(self.exporter.export(SparseProbs.cat(rows).pack(), batch.transport or "inline"))
        out.compute_ms = (time.perf_counter() - t) * 1e3
        return out
