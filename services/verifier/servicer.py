"""Verifier: one target forward over each sequence's uncached tokens plus its drafts, then lossless acceptance
(greedy argmax match, or rejection sampling against the draft probabilities it reads by handle)."""

from __future__ import annotations

import time

import torch

from minedraft.runtime.sampling import SparseProbs
from minedraft.runtime.speculative import VerifyRequest, verify_batch
from minedraft.v1 import model_service_pb2 as pb, model_service_pb2_grpc as pb_grpc
from services.model_service import ModelService


class VerifierService(ModelService):
    role = "verifier"
    generator_salt = 0
    work_kind, response_cls = "verify", pb.VerifierResponse
    grpc_service = pb.DESCRIPTOR.services_by_name["Verifier"].full_name

    def add_to_server(self, server) -> None:
        pb_grpc.add_VerifierServicer_to_server(self, server)

    def work(self, batch: pb.VerifyBatch, owned: set[str]) -> pb.VerifyResultMsg:
        t = time.perf_counter()
        for ref in batch.discard:
            self.importer.discard(ref)
        refs = ([batch.draft_probs] if batch.HasField("draft_probs") else []) + list(batch.more_draft_probs)
        qs = [self._draft_probs(self.importer.open(ref)) for ref in refs]
        reqs = []
        for s in batch.seqs:
            params, gen = self.seq_state(s.seq_id, s.start, s.sampling, owned)
            probs = None
            if s.drafts and not params.greedy:
                q = qs[s.probs_ref] if 0 <= s.probs_ref < len(qs) else None
                if q is None or s.probs_row < 0 or s.probs_row + len(s.drafts) > q.ids.shape[0]:
                    raise ValueError(f"sequence {s.seq_id!r} samples but its draft probabilities are missing")
                probs = q[s.probs_row: s.probs_row + len(s.drafts)]
            reqs.append(VerifyRequest(s.seq_id, s.start, list(s.tokens), list(s.drafts), probs, params, gen))
        if not reqs:
            return pb.VerifyResultMsg()
        res = verify_batch(self.runner, reqs)
        out = pb.VerifyResultMsg()
        for s, n, toks in zip(batch.seqs, res.num_accepted.tolist(), res.tokens):
            out.seqs.add(seq_id=s.seq_id, num_accepted=n, tokens=toks)
        out.compute_ms = (time.perf_counter() - t) * 1e3
        return out

    def _draft_probs(self, packed) -> SparseProbs:
        """The drafter's distributions, checked before use: a bad id would index outside the vocabulary."""
        q = SparseProbs.unpack(packed)
        vocab = self.model.arch.vocab_size
        if q.ids.numel() and (int(q.ids.min()) < 0 or int(q.ids.max()) >= vocab):
            raise ValueError(f"draft probabilities name tokens outside the vocabulary [0, {vocab})")
        if not bool(torch.isfinite(q.probs).all()) or bool((q.probs < 0).any()):
            raise ValueError("draft probabilities must be finite and >= 0")
        return q
