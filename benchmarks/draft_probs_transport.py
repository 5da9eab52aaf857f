"""What a sampled speculative step costs in draft-probability traffic: bytes shipped from the drafter to the verifier
per step, and the two services' step times, per transport (inline, shm), at a real vocabulary.

Runs the real drafter and verifier servicers in this process (their `step` on protobuf requests, as a Session would
call it: the same code as in production minus the sockets), so it runs unchanged against another checkout of the
project for a before/after comparison:

    PYTHONPATH=. python benchmarks/draft_probs_transport.py --target T --draft D --out results.json
    cd /path/to/old/checkout && PYTHONPATH=. python /path/to/this/file ... --out before.json

Each measured step: one propose of k drafts for B sampled sequences, then one verify of them (which opens the
draft probabilities by their reference). Median of --repeats, after a warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--transports", default="inline,shm")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from minedraft.config import ModelServiceConfig
    from minedraft.v1 import common_pb2, model_service_pb2 as pb
    from services.drafter.servicer import DrafterService
    from services.verifier.servicer import VerifierService

    cfg = dict(kv_cache_tokens=a.batch * (a.prompt_tokens + 64 * (a.repeats + 2)), dtype=a.dtype)
    drafter, verifier = DrafterService(ModelServiceConfig(model=a.draft, **cfg)), \
        VerifierService(ModelServiceConfig(model=a.target, **cfg))
    t = time.perf_counter()
    drafter.load()
    verifier.load()
    print(f"loaded both models in {time.perf_counter() - t:.0f} s", flush=True)
    verifier.importer.trust(drafter.instance_id)  # what transport negotiation does
    vocab = verifier.model.arch.vocab_size
    gen = torch.Generator().manual_seed(0)
    results = {"batch": a.batch, "k": a.k, "vocab": vocab, "dtype": a.dtype, "transports": {}}

    for transport in a.transports.split(","):
        d_owned, v_owned = set(), set()
        seqs = [{"id": f"{transport}-{i}", "tokens": torch.randint(100, vocab - 100, (a.prompt_tokens,),
                                                                    generator=gen).tolist(), "d": 0, "v": 0}
                for i in range(a.batch)]
        sampling = common_pb2.SamplingOptions(temperature=0.8, seed=1)
        steps, ids = [], iter(range(1, 10 ** 6))
        for rep in range(a.repeats + 1):
            propose = pb.ProposeBatch(transport=transport)
            for s in seqs:
                propose.seqs.add(seq_id=s["id"], start=s["d"], tokens=s["tokens"][s["d"]:], k=a.k, sampling=sampling)
            t0 = time.perf_counter()
            dresp = drafter.step(pb.DrafterRequest(step_id=next(ids), propose=propose), d_owned)
            t1 = time.perf_counter()
            if dresp.WhichOneof("kind") == "error":
                raise SystemExit(f"draft step failed: {dresp.error.message}")
            out = dresp.propose
            ref = out.probs
            kind = ref.WhichOneof("payload")
            nbytes = len(ref.inline_data) if kind == "inline_data" else ref.shm.nbytes if kind == "shm" else 0
            verify = pb.VerifyBatch(draft_probs=ref)
            for s, dseq in zip(seqs, out.seqs):
                verify.seqs.add(seq_id=s["id"], start=s["v"], tokens=s["tokens"][s["v"]:], drafts=list(dseq.tokens),
                                probs_row=dseq.probs_row, sampling=sampling)
            t2 = time.perf_counter()
            vresp = verifier.step(pb.VerifierRequest(step_id=next(ids), verify=verify), v_owned)
            t3 = time.perf_counter()
            if vresp.WhichOneof("kind") == "error":
                raise SystemExit(f"verify step failed: {vresp.error.message}")
            drafter.step(pb.DrafterRequest(step_id=next(ids), release=pb.Release(buffers=[ref.shm.name])), d_owned)
            for s, dseq, vseq in zip(seqs, out.seqs, vresp.verify.seqs):
                old = len(s["tokens"])
                s["tokens"] += list(vseq.tokens)
                s["v"] = old + vseq.num_accepted
                s["d"] = min(old + max(len(dseq.tokens) - 1, 0), s["v"])
            if rep:  # the first step prefills both caches: not a decode step
                steps.append({"probs_bytes": nbytes, "draft_ms": 1e3 * (t1 - t0), "verify_ms": 1e3 * (t3 - t2),
                              "draft_compute_ms": out.compute_ms, "verify_compute_ms": vresp.verify.compute_ms,
                              "accepted": sum(v.num_accepted for v in vresp.verify.seqs)})
        row = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
        results["transports"][transport] = row
        print(f"{transport:6}: {row['probs_bytes'] / 1e6:8.2f} MB of draft probabilities per step; draft step "
              f"{row['draft_ms']:7.0f} ms, verify step {row['verify_ms']:7.0f} ms; accepted {row['accepted']:.0f} "
              f"of {a.batch * a.k}", flush=True)
        drafter.release(list(d_owned), d_owned)
        verifier.release(list(v_owned), v_owned)
    drafter.exporter.release_all()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
