"""Sampling and speculative-decoding verification as pure tensor functions.

Kept free of servers and models so that the one property that matters -- verification
never changes the target model's output distribution -- can be tested statistically.
Everything stays on the device of its inputs; the only host round trip is the final
``.tolist()`` that turns accepted tokens into Python lists for the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

# Dividing logits by a temperature this small overflows float32, and the resulting
# distribution is the argmax to within float precision anyway, so treat it as greedy.
_GREEDY_EPS = 1e-5
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # Plain seed + salt would make (seed=1, salt=0) replay (seed=0, salt=1); mixing keeps
    # the drafter and verifier streams of nearby seeds unrelated.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 => greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 => disabled
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def validate(self) -> None:
        """Called at request admission so the hot path can trust the values."""
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:  # nan fails too
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    def make_generator(self, salt: int = 0) -> torch.Generator | None:
        """A CPU generator on purpose: the seeded stream is then identical whether the
        model runs on CPU or CUDA, and the uniforms it yields are tiny to copy over."""
        if self.seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(_splitmix64((self.seed & _MASK64) ^ _splitmix64(salt & _MASK64)))
        return g


def logits_to_probs(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Per-row parameter tensors instead of grouping rows by params: one pass for any mix.

    Top-k and top-p cut at a probability *value* and keep every token tied with the cut,
    so the kept set never depends on how a sort orders ties (CPU and CUDA sorts differ).
    """
    n, v = logits.shape
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} rows")
    dev = logits.device
    logits = logits.float()
    temp = torch.tensor([1.0 if p.greedy else float(p.temperature) for p in params], device=dev)
    scaled = logits / temp[:, None]

    need_k = any(0 < p.top_k < v and not p.greedy for p in params)
    need_p = any(p.top_p < 1 and not p.greedy for p in params)
    if need_k or need_p:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
    if need_k:
        k = torch.tensor([p.top_k if 0 < p.top_k < v else v for p in params], device=dev)
        kth = sorted_logits.gather(1, (k - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = scaled.softmax(dim=-1)
    if need_p:
        top_p = torch.tensor([float(p.top_p) for p in params], device=dev)[:, None]
        # Masking only zeroed the tail, so the pre-masking order still sorts the probs.
        sorted_probs = probs.gather(1, order)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        n_keep = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        cutoff = sorted_probs.gather(1, n_keep - 1)
        # top_p == 1 keeps everything; cumsum rounding must not drop the far tail.
        cutoff = torch.where(top_p >= 1, torch.zeros_like(cutoff), cutoff)
        probs = probs.masked_fill(probs < cutoff, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if any(p.greedy for p in params):
        greedy = torch.tensor([p.greedy for p in params], device=dev)[:, None]
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy, onehot, probs)
    return probs


def _uniforms(generators: Sequence[torch.Generator | None], counts: Sequence[int], width: int,
              device: torch.device) -> Tensor:
    """U[0,1) float64 of shape [B, width]; a seeded row draws exactly counts[b] values (its
    first counts[b]-1 in the leading columns, the last in the final column), so a seeded
    request's stream depends only on its own work, never on batch padding or neighbours."""
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        out = torch.rand(len(generators), width, dtype=torch.float64, device=device)
    else:
        out = torch.empty(len(generators), width, dtype=torch.float64, device=device)
    if not seeded:
        return out
    draws = torch.zeros(len(seeded), width, dtype=torch.float64)
    for row, i in enumerate(seeded):
        g, c = generators[i], counts[i]
        d = torch.rand(c, generator=g, device=g.device, dtype=torch.float64).cpu()
        draws[row, : c - 1] = d[:-1]
        draws[row, -1] = d[-1]
    out[torch.tensor(seeded, device=device)] = draws.to(device)
    return out


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling rather than multinomial: it takes uniforms from any generator
    on any device and accepts unnormalised rows (the rejection residual)."""
    cdf = probs.double().cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    # Rounding can push u * total onto the end of the CDF; never return a zero-mass token.
    last_nonzero = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(idx, last_nonzero)


def sample(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """One token per row from that row's generator (None => global RNG). One-hot rows
    return their hot index whatever the uniform."""
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
    u = _uniforms(generators, [1] * len(generators), 1, probs.device)
    return _inverse_cdf(probs, u[:, 0])


@dataclass
class SparseProbs:
    """Distributions over a vocabulary stored by their support: `ids` [..., S] token ids and `probs` [..., S] their
    probabilities (a row shorter than S is padded with probability 0). At a 152k vocabulary a dense draft
    distribution is 607 KB per draft token; the draft's top few hundred tokens hold nearly all of its mass."""

    ids: Tensor  # int64
    probs: Tensor  # float32

    @property
    def width(self) -> int:
        return self.ids.shape[-1]

    def __getitem__(self, index) -> "SparseProbs":
        return SparseProbs(self.ids[index], self.probs[index])

    def padded(self, width: int) -> "SparseProbs":
        pad = width - self.width
        if pad <= 0:
            return self
        return SparseProbs(torch.nn.functional.pad(self.ids, (0, pad)), torch.nn.functional.pad(self.probs, (0, pad)))

    @staticmethod
    def cat(parts: Sequence["SparseProbs"]) -> "SparseProbs":
        width = max(p.width for p in parts)
        return SparseProbs(torch.cat([p.padded(width).ids for p in parts]),
                           torch.cat([p.padded(width).probs for p in parts]))

    def to(self, device) -> "SparseProbs":
        return SparseProbs(self.ids.to(device), self.probs.to(device))

    def pack(self) -> Tensor:
        """One int32 tensor [rows, 2, S] (ids, then the float32 probabilities' bits): one buffer to ship."""
        return torch.stack([self.ids.to(torch.int32), self.probs.float().contiguous().view(torch.int32)], dim=-2)

    @staticmethod
    def unpack(packed: Tensor) -> "SparseProbs":
        if packed.dtype != torch.int32 or packed.dim() != 3 or packed.shape[1] != 2:
            raise ValueError(f"packed draft probabilities must be int32 [rows, 2, S], got {packed.dtype} "
                             f"{list(packed.shape)}")
        return SparseProbs(packed[:, 0].long(), packed[:, 1].contiguous().view(torch.float32))

    def at(self, tokens: Tensor) -> Tensor:
        """Probability of `tokens` [...] under each row [..., S] (0 outside the support)."""
        return (self.probs * (self.ids == tokens[..., None])).sum(-1)

    def dense(self, vocab: int) -> Tensor:
        out = torch.zeros(*self.ids.shape[:-1], vocab, dtype=torch.float32, device=self.probs.device)
        return out.scatter_add_(-1, self.ids, self.probs.float())


def compact(probs: Tensor, max_support: int) -> SparseProbs:
    """The distribution a sampled draft is drawn from and shipped as: each row's `max_support` likeliest tokens
    (fewer where top-k / top-p left fewer), renormalised. Any draft distribution keeps rejection sampling exact, as
    long as the verifier judges the drafts by the very distribution they were drawn from: this one."""
    width = min(max_support, probs.shape[-1])
    vals, ids = probs.float().topk(width, dim=-1)
    width = max(1, int((vals > 0).sum(-1).max()))  # topk sorts: the zeros are at the end
    vals, ids = vals[..., :width], ids[..., :width]
    return SparseProbs(ids, vals / vals.sum(-1, keepdim=True))


def sample_sparse(dist: SparseProbs, generators: Sequence[torch.Generator | None]) -> Tensor:
    """One token id per row of a [rows, S] SparseProbs, drawn as `sample` draws."""
    return dist.ids.gather(1, sample(dist.probs, generators)[:, None]).squeeze(1)


def _q_at(q: Tensor | SparseProbs, x: Tensor) -> Tensor:
    return q.at(x) if isinstance(q, SparseProbs) else q.gather(2, x[..., None]).squeeze(-1)


def _q_rows(q: Tensor | SparseProbs, rows: Tensor, pos: Tensor, vocab: int) -> Tensor:
    return q[rows, pos].dense(vocab) if isinstance(q, SparseProbs) else q[rows, pos].float()


@dataclass
class VerifyResult:
    num_accepted: Tensor  # LongTensor[B]: accepted draft tokens per row, 0..draft_lens[b]
    tokens: list[list[int]]  # per row: accepted draft tokens, then exactly one target token


def _lens(draft_lens: Tensor, k: int) -> list[int]:
    lens = [int(n) for n in draft_lens.tolist()]
    if any(not 0 <= n <= k for n in lens):
        raise ValueError(f"draft_lens must lie in [0, {k}], got {lens}")
    return lens


def _result(draft_tokens: Tensor, lens: list[int], num_accepted: Tensor, extra: Tensor) -> VerifyResult:
    rows, accepted, last = draft_tokens.tolist(), num_accepted.tolist(), extra.tolist()
    return VerifyResult(num_accepted, [r[:n] + [e] for r, n, e in zip(rows, accepted, last)])


def _valid(draft_tokens: Tensor, draft_lens: Tensor) -> Tensor:
    return torch.arange(draft_tokens.shape[1], device=draft_tokens.device) < draft_lens[:, None]


def verify_greedy(draft_tokens: Tensor, draft_lens: Tensor, target_logits: Tensor) -> VerifyResult:
    k = draft_tokens.shape[1]
    lens = _lens(draft_lens, k)
    draft_lens = draft_lens.to(device=draft_tokens.device, dtype=torch.long)
    best = target_logits.argmax(dim=-1)  # [B, K+1]
    match = (draft_tokens == best[:, :k]) & _valid(draft_tokens, draft_lens)
    num_accepted = match.long().cumprod(dim=1).sum(dim=1)
    extra = best.gather(1, num_accepted[:, None]).squeeze(1)
    return _result(draft_tokens, lens, num_accepted, extra)


def verify_rejection(draft_tokens: Tensor, draft_lens: Tensor, draft_probs: Tensor | SparseProbs,
                     target_probs: Tensor, generators: Sequence[torch.Generator | None]) -> VerifyResult:
    """Leviathan et al. / Chen et al.: emitted tokens are distributed exactly as the target's.

    Accept x_i iff u_i * q_i(x_i) < p_i(x_i) (i.e. with prob min(1, p/q)); on the first
    rejection resample from max(0, p_i - q_i), else take a bonus token from p at
    draft_lens. One-hot p makes this exactly greedy verification whatever q is.
    """
    b, k = draft_tokens.shape
    dev = target_probs.device
    lens = _lens(draft_lens, k)
    draft_lens = draft_lens.to(device=dev, dtype=torch.long)
    valid = _valid(draft_tokens, draft_lens)
    x = torch.where(valid, draft_tokens, torch.zeros_like(draft_tokens))  # padding may be out of range
    u = _uniforms(generators, [n + 1 for n in lens], k + 1, dev)

    p_x = target_probs[:, :k].gather(2, x[..., None]).squeeze(-1)
    q_x = _q_at(draft_probs, x)
    accept = (u[:, :k] * q_x < p_x) & valid  # NaN padding compares False
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)

    rows = torch.arange(b, device=dev)
    final = target_probs[rows, num_accepted].float()
    if k > 0:
        q_final = _q_rows(draft_probs, rows, num_accepted.clamp(max=k - 1), target_probs.shape[-1])
        residual = (final - q_final).clamp(min=0)
        use_residual = (num_accepted < draft_lens) & (residual.sum(dim=-1) > 0)
        final = torch.where(use_residual[:, None], residual, final)
    extra = _inverse_cdf(final, u[:, k])
    return _result(draft_tokens, lens, num_accepted, extra)


def verify(draft_tokens: Tensor, draft_lens: Tensor, target_logits: Tensor, draft_probs: Tensor | SparseProbs | None,
           params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> VerifyResult:
    """Greedy rows never touch draft_probs or their generator, so a greedy-only drafter
    need not materialise [B, K, V] probabilities."""
    b = draft_tokens.shape[0]
    if len(params) != b or len(generators) != b:
        raise ValueError(f"need one SamplingParams and one generator per row ({b}), "
                         f"got {len(params)} and {len(generators)}")
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return verify_greedy(draft_tokens, draft_lens, target_logits)
    if draft_probs is None:
        raise ValueError("draft_probs is required when any row samples (temperature > 0)")
    if len(sampled) == b:
        return _verify_sampled(draft_tokens, draft_lens, target_logits, draft_probs, params, generators)

    greedy = [i for i, p in enumerate(params) if p.greedy]
    s = _verify_sampled(*(_take(t, sampled) for t in (draft_tokens, draft_lens, target_logits, draft_probs)),
                        [params[i] for i in sampled], [generators[i] for i in sampled])
    g = verify_greedy(*(_take(t, greedy) for t in (draft_tokens, draft_lens, target_logits)))
    num_accepted = torch.empty(b, dtype=torch.long, device=s.num_accepted.device)
    tokens: list[list[int]] = [[] for _ in range(b)]
    for rows, res in ((sampled, s), (greedy, g)):
        num_accepted[torch.tensor(rows, device=num_accepted.device)] = res.num_accepted
        for i, t in zip(rows, res.tokens):
            tokens[i] = t
    return VerifyResult(num_accepted, tokens)


def _take(t: Tensor | SparseProbs, rows: Sequence[int]) -> Tensor | SparseProbs:
    return t[torch.tensor(rows, device=(t.ids if isinstance(t, SparseProbs) else t).device)]


def _verify_sampled(draft_tokens: Tensor, draft_lens: Tensor, target_logits: Tensor, draft_probs: Tensor | SparseProbs,
                    params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> VerifyResult:
    per_position = [p for p in params for _ in range(target_logits.shape[1])]
    target_probs = logits_to_probs(target_logits.flatten(0, 1), per_position).view(target_logits.shape)
    return verify_rejection(draft_tokens, draft_lens, draft_probs, target_probs, generators)
