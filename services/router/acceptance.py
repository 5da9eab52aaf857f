"""How many tokens a verification yields, estimated online: acceptance per draft position, and per request.

A verify step with k drafts yields the accepted prefix plus one target token. With alpha_j the probability that
draft j is accepted given drafts 1..j-1 were, the expected yield is 1 + sum_{j<=k} prod_{i<=j} alpha_i. The alphas
are counted per position over all requests of a lane (draft j is examined when drafts 1..j-1 were accepted; it is
accepted or rejected), with exponential forgetting so they follow a change of workload; each request scales them by
how its own acceptance compares to the lane's (some prompts are far easier to draft than others), shrunk towards the
lane's until it has a history. Positions never drafted yet borrow their predecessor's rate (an optimistic guess that
exploring a longer k corrects).

All pure: tests/test_policy.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRIOR_RATE = 0.6  # acceptance believed before anything is observed
PRIOR_WEIGHT = 4.0  # ... worth this many observations


def prefix_counts(lengths, size: int) -> np.ndarray:
    """counts[j] = how many of `lengths` exceed j, for j in 0..size-1: per position, how many prefixes (of accepted
    or examined drafts) reach it. Lengths above `size` count as `size`."""
    capped = np.minimum(np.asarray(lengths, dtype=int), size)
    return np.bincount(capped, minlength=size + 1)[::-1].cumsum()[::-1][1:]


@dataclass
class PositionAcceptance:
    """Accepted / examined counts per draft position (1-based positions stored at index j - 1)."""

    k_max: int
    memory: float = 2000.0  # verifications: an observation's weight decays by e after about this many more
    accepted: np.ndarray = field(init=False)
    examined: np.ndarray = field(init=False)

    def __post_init__(self):
        self.accepted = np.zeros(self.k_max)
        self.examined = np.zeros(self.k_max)

    def observe(self, drafted: int, accepted: int) -> None:
        """One verification of `drafted` drafts of which the first `accepted` were accepted."""
        self.observe_step([drafted], [accepted])

    def observe_step(self, drafted: list[int], accepted: list[int]) -> None:
        """A verify step's verifications at once (one decay and one count per position for the whole step)."""
        pairs = [(d, a) for d, a in zip(drafted, accepted) if d > 0]
        if not pairs:
            return
        decay = (1.0 - 1.0 / self.memory) ** len(pairs)
        self.accepted *= decay
        self.examined *= decay
        # a verification that examined s positions counts once at each of positions 1..s
        self.examined += prefix_counts([min(d, a + 1) for d, a in pairs], self.k_max)
        self.accepted += prefix_counts([a for _, a in pairs], self.k_max)

    def rates(self) -> np.ndarray:
        """alpha_j for j = 1..k_max."""
        out = np.empty(self.k_max)
        prev = PRIOR_RATE
        for j in range(self.k_max):
            prior = prev if self.examined[j] < 1 else PRIOR_RATE
            out[j] = (self.accepted[j] + PRIOR_WEIGHT * prior) / (self.examined[j] + PRIOR_WEIGHT)
            prev = out[j]
        return np.clip(out, 0.0, 0.995)

    @property
    def overall(self) -> float:
        """Acceptance rate over all positions (accepted / examined)."""
        return float((self.accepted.sum() + PRIOR_WEIGHT * PRIOR_RATE) / (self.examined.sum() + PRIOR_WEIGHT))


def request_scale(accepted: int, examined: int, lane_rate: float) -> float:
    """How much easier (>1) or harder (<1) one request drafts than the lane's average, shrunk towards 1."""
    rate = (accepted + PRIOR_WEIGHT * lane_rate) / (examined + PRIOR_WEIGHT)
    return rate / max(lane_rate, 1e-6)


def expected_tokens(alphas: np.ndarray, k_max: int) -> np.ndarray:
    """[..., k_max + 1]: expected tokens per verification with k = 0..k_max drafts, for rows of alphas [..., k]."""
    survive = np.cumprod(alphas[..., :k_max], axis=-1)
    return 1.0 + np.concatenate([np.zeros(alphas.shape[:-1] + (1,)), np.cumsum(survive, axis=-1)], axis=-1)


def all_accepted(alphas: np.ndarray, k: int) -> np.ndarray:
    """Probability that all k drafts and the drafter's guess of the target's next token are accepted: what a
    draft-ahead (drafted during verification, assuming acceptance) needs to be usable."""
    return np.prod(alphas[..., :k + 1], axis=-1)
