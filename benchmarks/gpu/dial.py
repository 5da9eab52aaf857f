"""Acceptance dial: a random-init target/draft pair whose greedy per-token acceptance rate is a chosen `a`.

Random weights give the right cost but meaningless acceptance (two random models almost never agree). The dial keeps
the full cost of the real forward and then adds a large bias (+1e4, fp32) to one token per logits row, which makes
that token the greedy choice whatever the weights say:

    target row with input token t (at any position):  f(t) = (t * 2654435761 + 40503) mod V
    draft  row with input token t at position p:       f(t)            if h(t, p) mod 2^16 <  round(a * 2^16)
                                                        (f(t) + 1) mod V otherwise

h is a fixed integer hash, so whether the draft is right at (t, p) is a pseudo-random coin of bias `a`, independent
across the (token, position) pairs a generation visits; after a rejection the target's own token moves the chain to a
new pair. Greedy speculative decoding then accepts each draft token with probability ~a, and its output is still
exactly the target's (the chain t -> f(t)): the dial never breaks losslessness, it only sets how often drafts match.

Everything is device tensor ops (no .item(), .tolist() or data-dependent shapes), so a runner may capture the dialed
forward in a CUDA graph. The rows' input tokens are tokens[logit_rows] and their positions batch.positions[logit_rows].
"""

from __future__ import annotations

import torch

from minedraft.runtime.model import CausalLM
from minedraft.runtime.sequence import Sequence

BIAS = 1e4
SCALE = 1 << 16  # the coin compares a 16-bit hash with round(a * 2^16)
_F_MUL, _F_ADD = 2654435761, 40503
_M32 = 0xFFFFFFFF


def target_token(tok: torch.Tensor, vocab: int) -> torch.Tensor:
    """f(t): the token the dialed target predicts after input token t (int64 in, int64 out)."""
    return torch.remainder(tok.long() * _F_MUL + _F_ADD, vocab)


def draft_hit(tok: torch.Tensor, pos: torch.Tensor, threshold: int, seed: int = 0) -> torch.Tensor:
    """Bool: does the dialed draft predict f(t) at (t, p)? Every product stays below 2^63 (no int64 overflow)."""
    x = (tok.long() * 0x9E3779B1 + pos.long() * 0x85EBCA77 + (seed * 0x27D4EB2F + 0x165667B1)) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _M32
    x = x ^ (x >> 16)
    return (x & (SCALE - 1)) < threshold


def dialed_token(role: str, tok: torch.Tensor, pos: torch.Tensor, vocab: int, threshold: int,
                 seed: int = 0) -> torch.Tensor:
    f = target_token(tok, vocab)
    if role == "target":
        return f
    return torch.where(draft_hit(tok, pos, threshold, seed), f, torch.remainder(f + 1, vocab))


def dial_logits(logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                logit_rows: torch.Tensor | None, role: str, vocab: int, threshold: int, seed: int = 0,
                bias: float = BIAS) -> torch.Tensor:
    """logits [R, V'] of the rows `logit_rows` (all packed rows when None) -> the same plus `bias` on one token/row."""
    if logit_rows is not None:
        tokens, positions = tokens[logit_rows], positions[logit_rows]
    idx = dialed_token(role, tokens, positions, vocab, threshold, seed)[:, None]
    add = torch.full((logits.shape[0], 1), bias, dtype=logits.dtype, device=logits.device)
    return logits.scatter_add(1, idx, add)


class DialLM(CausalLM):
    """Same weights, same attributes, same forward signature as the wrapped CausalLM (it shares its __dict__), so a
    ModelRunner takes it for the model itself; forward runs the real forward (full cost) and then biases one token per
    row. role: 'target' or 'draft'; rate: the draft's per-token greedy acceptance a in [0, 1]."""

    def __init__(self, base: CausalLM, role: str, rate: float, vocab: int | None = None, seed: int = 0,
                 bias: float = BIAS):
        if role not in ("target", "draft"):
            raise ValueError(f"role must be 'target' or 'draft', got {role!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must lie in [0, 1], got {rate}")
        self.__dict__.update(base.__dict__)
        self.dial_role = role
        self.dial_rate = float(rate)
        self.dial_vocab = int(vocab if vocab is not None else base.arch.vocab_size)
        self.dial_threshold = int(round(rate * SCALE))
        self.dial_seed = int(seed)
        self.dial_bias = float(bias)

    @torch.inference_mode()
    def forward(self, tokens, batch, kv, logit_rows=None, *args, **kwargs):
        logits = super().forward(tokens, batch, kv, logit_rows, *args, **kwargs)
        return dial_logits(logits, tokens, batch.positions, logit_rows, self.dial_role, self.dial_vocab,
                           self.dial_threshold, self.dial_seed, self.dial_bias)


def dial_pair(target: CausalLM, draft: CausalLM, rate: float, seed: int = 0) -> tuple[DialLM, DialLM]:
    vocab = min(target.arch.vocab_size, draft.arch.vocab_size)
    return DialLM(target, "target", rate, vocab, seed), DialLM(draft, "draft", rate, vocab, seed)


class CountingSequence(Sequence):
    """A Sequence that also counts verify steps that had drafts and those that rejected one, so the per-token
    acceptance a can be estimated as accepted / (accepted + rejections) (each draft token examined is a coin flip
    until the first rejection; drafts after it are never examined)."""

    def on_verified(self, num_drafts: int, num_accepted: int, new_tokens: list[int]) -> list[int]:
        n = num_drafts
        if n:
            self.__dict__["dial_steps"] = self.__dict__.get("dial_steps", 0) + 1
            if num_accepted < n:
                self.__dict__["dial_rejections"] = self.__dict__.get("dial_rejections", 0) + 1
        return super().on_verified(num_drafts, num_accepted, new_tokens)


def counting(seqs: list[Sequence]) -> list[Sequence]:
    for s in seqs:
        s.__class__ = CountingSequence
    return seqs


def acceptance_stats(seqs: list[Sequence], k: int | None = None, rate: float | None = None) -> dict:
    accepted = sum(s.accepted for s in seqs)
    drafted = sum(s.drafted for s in seqs)
    steps = sum(s.__dict__.get("dial_steps", 0) for s in seqs)
    rejections = sum(s.__dict__.get("dial_rejections", 0) for s in seqs)
    out = {"drafted": drafted, "accepted": accepted, "draft_steps": steps, "rejections": rejections,
           "per_token_acceptance": accepted / (accepted + rejections) if accepted + rejections else None,
           "accepted_over_drafted": accepted / drafted if drafted else None,
           "mean_accepted_per_step": accepted / steps if steps else None,
           "tokens_per_step": (accepted + steps) / steps if steps else None}
    if k is not None and rate is not None:
        out["expected_tokens_per_step"] = sum(rate ** i for i in range(k + 1))  # (1 - a^(k+1)) / (1 - a)
    return out


# ---- self-test ---------------------------------------------------------------------------------------------------

def self_test(device: str = "cpu", rate: float = 0.8, k: int = 4, batch: int = 16, new_tokens: int = 80,
              prompt_len: int = 24, tol: float = 0.05, log=print) -> dict:
    """1) the coin: the fraction of random (t, p) pairs where the draft agrees with the target is ~rate;
    2) through the real runtime (tiny models, reference.generate): greedy ar output follows the chain t -> f(t),
    greedy sd output == ar output, and the measured per-token acceptance is within tol of rate;
    3) on CUDA: the dial is sync-free (sync debug mode 'error') and capturable in a CUDA graph.
    Returns a dict of results with 'ok'; raises nothing (the caller decides)."""
    from minedraft.runtime.reference import generate, make_sequences
    from minedraft.runtime.runner import ModelRunner
    from minedraft.runtime.sampling import SamplingParams

    from shapes import build_random_model

    dev = torch.device(device)
    res: dict = {"device": device, "rate": rate, "k": k, "checks": {}}
    thr = int(round(rate * SCALE))

    # 1) the coin alone, 200k random pairs at a real vocabulary size
    g = torch.Generator(device="cpu").manual_seed(1)
    tok = torch.randint(0, 151936, (200_000,), generator=g).to(dev)
    pos = torch.randint(0, 8192, (200_000,), generator=g).to(dev)
    hit = draft_hit(tok, pos, thr).float().mean().item()
    res["checks"]["coin_rate"] = {"value": hit, "ok": abs(hit - rate) < 0.01}

    # 2) end to end through the runtime
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    tgt = build_random_model("tiny-target", dev, dtype, seed=1)
    drf = build_random_model("tiny-draft", dev, dtype, seed=2)
    t_m, d_m = dial_pair(tgt, drf, rate)
    vocab = t_m.dial_vocab
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, vocab, (prompt_len + i,), generator=gen).tolist() for i in range(batch)]
    cap = batch * (prompt_len + batch + new_tokens + k + 2 + 16) + 64
    greedy = SamplingParams()
    with torch.inference_mode():
        ar = generate(ModelRunner(t_m, cap), make_sequences(prompts, greedy, new_tokens, 4096, ignore_eos=True))
        sd_seqs = counting(make_sequences(prompts, greedy, new_tokens, 4096, ignore_eos=True))
        sd = generate(ModelRunner(t_m, cap), sd_seqs, ModelRunner(d_m, cap), k)
    chain_ok = True
    for s in ar:
        prev = s.prompt[-1]
        for t in s.output:
            chain_ok &= t == (prev * _F_MUL + _F_ADD) % vocab
            prev = t
    res["checks"]["ar_follows_dial_chain"] = {"ok": bool(chain_ok)}
    same = [a.output == b.output for a, b in zip(ar, sd)]
    res["checks"]["sd_equals_ar"] = {"ok": all(same), "mismatched_sequences": same.count(False)}
    st = acceptance_stats(sd, k, rate)
    acc = st["per_token_acceptance"]
    res["checks"]["sd_acceptance"] = {"value": acc, "ok": acc is not None and abs(acc - rate) < tol,
                                      "trials": st["accepted"] + st["rejections"], **st}

    # 3) CUDA: sync-free and graph-capturable
    if dev.type == "cuda":
        try:
            R, V = 64, 151936
            logits = torch.randn(R, V, device=dev)
            toks = torch.randint(0, V, (R * 5,), device=dev)
            poss = torch.randint(0, 4096, (R * 5,), device=dev)
            rows = torch.arange(4, R * 5, 5, device=dev)
            torch.cuda.synchronize()
            prev_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                eager = dial_logits(logits, toks, poss, rows, "draft", V, thr)
            finally:
                torch.cuda.set_sync_debug_mode(prev_mode)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    dial_logits(logits, toks, poss, rows, "draft", V, thr)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = dial_logits(logits, toks, poss, rows, "draft", V, thr)
            graph.replay()
            torch.cuda.synchronize()
            res["checks"]["cuda_graph_capturable"] = {"ok": bool(torch.equal(out, eager))}
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            res["checks"]["cuda_graph_capturable"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    res["ok"] = all(c["ok"] for c in res["checks"].values())
    log(f"dial self-test on {device}: " + ", ".join(
        f"{n}={'ok' if c['ok'] else 'FAIL'}" + (f" ({c['value']:.3f})" if isinstance(c.get("value"), float) else "")
        for n, c in res["checks"].items()))
    return res


if __name__ == "__main__":
    import argparse
    import json
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description="dial self-test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rate", type=float, default=0.8)
    args = ap.parse_args()
    r = self_test(args.device, args.rate)
    print(json.dumps(r, indent=1, default=str))
    sys.exit(0 if r["ok"] else 1)
