"""What a step of each model service costs, as a function of its shape, fitted online from what the services report.

A call costs c0 once (the service's request handling, step setup), and each forward in it c1 + c2 * sequences +
c3 * tokens + c4 * attended milliseconds: a fixed part (kernel launches, Python, reading the weights once: why batching
pays), a part per sequence (host-side bookkeeping, per-sequence attention setup), a part per new token (the matmuls),
and a part per (new token, cached key) pair (attention). A draft call of k runs k forwards for one c0, so the per-call
and the per-forward parts must be told apart: a model with one intercept per forward overprices short drafts' calls
and underprices long ones. Only decode-shaped steps are fitted (a few tokens per sequence): a prompt's prefill runs the matmuls at
another efficiency and would bend a model of what the controller chooses between, which is decode steps. A verify step is one forward over every sequence's uncached tokens plus its drafts; a
draft step of k is k forwards, the first over the sequences' uncached tokens, the others over one token each, with
sequences dropping out as their drafts are complete. So both are sums of forward features, and one linear model per
service, fitted by recursive least squares with forgetting, predicts any step the controller may consider: another
batch size, another k, longer contexts.

The services report the compute time of every step (`compute_ms`); what a call takes beyond it (serialization, the
network, the services' own request handling) is tracked as a per-call overhead, and the router's own time per tick
as another. All pure: no servers in here (tests/test_costs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Features are scaled so that typical values are O(1): the recursive least squares stays well conditioned.
_SCALE = np.array([1.0, 1.0, 1e-1, 1e-2, 1e-5])
_CALL = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
DECODE_TOKENS = 16  # at most this many new tokens per sequence make a step decode-shaped (fitted); more is a prefill


def forward_features(rows: list[tuple[int, int]]) -> np.ndarray:
    """Features of one forward over sequences given as (cached length, new tokens):
    [0 calls, 1 forward, seqs, tokens, attended]."""
    tokens = sum(n for _, n in rows)
    attended = sum(n * (start + (n + 1) / 2) for start, n in rows)
    return np.array([0.0, 1.0, len(rows), tokens, attended]) * _SCALE if rows else np.zeros(5)


def decode_shaped(rows) -> bool:
    """Does a step only append a few tokens per sequence (no prompt prefill in it)? rows: (start, tokens, ...)."""
    return bool(rows) and all(r[1] <= DECODE_TOKENS for r in rows)


def verify_features(rows: list[tuple[int, int]]) -> np.ndarray:
    """A verify call: (cached length, uncached tokens + drafts) per sequence, one forward."""
    return _CALL + forward_features(rows) if rows else np.zeros(5)


def draft_features(rows: list[tuple[int, int, int]]) -> np.ndarray:
    """A draft step: (cached length, tokens fed first, forwards) per sequence. Forward d feeds every sequence with
    more than d forwards: its first tokens at d = 0, one token (the previous draft) after."""
    total, depth = _CALL.copy() if rows else np.zeros(5), 0
    while True:
        live = [(start, feed, n) for start, feed, n in rows if n > depth]
        if not live:
            return total
        total += forward_features([(start, feed) if depth == 0 else (start + feed + depth - 1, 1)
                                   for start, feed, _ in live])
        depth += 1


def draft_forwards(k: int, drafted: int) -> int:
    """Forwards a sequence took part in: one per draft, plus the one whose low confidence stopped it early (it
    computed the distribution of a draft that was not made)."""
    return drafted if drafted >= k else drafted + 1


@dataclass
class LinearCost:
    """ms ~ theta . features, by recursive least squares with exponential forgetting (`memory` steps, roughly)."""

    theta: np.ndarray
    cov: np.ndarray
    memory: float = 500.0
    updates: int = 0

    @classmethod
    def prior(cls, per_forward_ms: float, per_token_ms: float, per_attended_ms: float = 0.0, per_seq_ms: float = 0.0,
              per_call_ms: float = 0.0, confidence: float = 1.0) -> "LinearCost":
        theta = np.array([per_call_ms, per_forward_ms, per_seq_ms, per_token_ms, per_attended_ms]) / _SCALE
        return cls(theta, np.eye(5) * (100.0 / confidence))

    def predict(self, x: np.ndarray) -> float:
        return max(float(x @ self.theta), 1e-3 * float(x[1]))

    def update(self, x: np.ndarray, ms: float) -> None:
        if not x.any() or not np.isfinite(ms):
            return
        lam = 1.0 - 1.0 / self.memory
        px = self.cov @ x
        gain = px / (lam + x @ px)
        self.theta = self.theta + gain * (ms - x @ self.theta)
        self.cov = (self.cov - np.outer(gain, px)) / lam
        self.updates += 1


@dataclass
class Ema:
    value: float
    weight: float = 0.1

    def update(self, x: float) -> None:
        if np.isfinite(x):
            self.value += self.weight * (x - self.value)


@dataclass
class CostModel:
    """Predicted wall time of the steps a tick may contain, in ms."""

    verify: LinearCost
    draft: LinearCost
    verify_overhead: Ema = field(default_factory=lambda: Ema(1.0))
    draft_overhead: Ema = field(default_factory=lambda: Ema(1.0))
    tick_overhead: Ema = field(default_factory=lambda: Ema(0.5))

    @classmethod
    def guess(cls) -> "CostModel":
        """Before any measurement (a profile replaces it at start-up): a small model on a CPU core."""
        return cls(LinearCost.prior(5.0, 0.5, confidence=0.01), LinearCost.prior(2.0, 0.1, confidence=0.01))

    def verify_ms(self, n: int, sum_ctx: float, q: int) -> float:
        """t_verify from sums: n sequences with these summed cached lengths, q new tokens each (O(1): the
        controller scores dozens of choices per decision)."""
        if n <= 0:
            return 0.0
        x = np.array([1.0, 1.0, n, n * q, q * sum_ctx + n * q * (q + 1) / 2]) * _SCALE
        return self.verify.predict(x) + self.verify_overhead.value

    def draft_ms(self, n: float, sum_ctx: float, k: int) -> float:
        """t_draft from sums: k drafts for n sequences (one token fed first), O(1)."""
        return self.draft_call_ms([(n, sum_ctx, k)])

    def draft_call_ms(self, groups) -> float:
        """One draft call over groups of sequences, each (sequences, their summed cached lengths, drafts each), one
        token fed first: as many forwards as the longest draft, each over the sequences still drafting. Sequence
        counts may be expected values (fractions). 0 for an empty call."""
        groups = [(n, c, k) for n, c, k in groups if n > 0 and k > 0]
        if not groups:
            return 0.0
        rows = sum(k * n for n, _, k in groups)  # (sequence, forward) pairs: one token each
        attended = sum(k * c + n * k * (k + 1) / 2 for n, c, k in groups)
        x = np.array([1.0, max(k for _, _, k in groups), rows, rows, attended])
        return self.draft.predict(x * _SCALE) + self.draft_overhead.value

    def t_verify(self, contexts: np.ndarray, q: int) -> float:
        """One verify call over sequences with these cached lengths, appending q tokens each."""
        return self.verify_ms(len(contexts), float(np.sum(contexts)), q)

    def t_draft(self, contexts: np.ndarray, k: int) -> float:
        """One draft call of k drafts for sequences with these cached lengths (one token fed first)."""
        return self.draft_ms(len(contexts), float(np.sum(contexts)), k)
