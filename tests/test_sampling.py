"""Tests for minedraft.runtime.sampling.

The statistical tests use fixed seeds, so they are deterministic; the p-value threshold
(1e-3) only decides whether the fixed outcome is consistent with the target distribution.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from minedraft.runtime.sampling import (
    SamplingParams,
    SparseProbs,
    compact,
    logits_to_probs,
    sample,
    sample_sparse,
    verify,
    verify_greedy,
    verify_rejection,
)

P = SamplingParams
ALPHA = 1e-3


# ---------------------------------------------------------------- helpers


def chi2_pvalue(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Chi-square goodness of fit; cells the target gives zero mass must never occur."""
    counts = np.bincount(observed, minlength=len(expected_probs))
    zero = expected_probs == 0
    assert counts[zero].sum() == 0, f"sampled zero-probability tokens {np.nonzero(zero & (counts > 0))[0]}"
    exp = expected_probs[~zero] / expected_probs[~zero].sum() * counts.sum()
    assert exp.min() >= 5, "test too small for chi-square"
    return stats.chisquare(counts[~zero], exp).pvalue


def mixed_dist(rng: np.random.Generator, v: int, zero: int | None = None) -> np.ndarray:
    """Random distribution with every cell >= ~1/(2v) (so chi-square cells are well filled),
    optionally with one exact zero to exercise p = 0 / q = 0 paths."""
    d = 0.5 * rng.dirichlet(np.ones(v)) + 0.5 / v
    if zero is not None:
        d[zero] = 0.0
    return d / d.sum()


def onehot_logits(argmaxes: list[list[int]], v: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(argmaxes), v).float() * 3.0


def ref_probs(logits: np.ndarray, t: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent numpy reference: temperature, then top-k, then top-p (tie-inclusive)."""
    z = logits.astype(np.float64) / t
    if 0 < top_k < len(z):
        z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        mass, cutoff = 0.0, 0.0
        for prob in sorted(p, reverse=True):
            mass += prob
            cutoff = prob
            if mass >= top_p:
                break
        p = np.where(p >= cutoff, p, 0.0)
        p /= p.sum()
    return p


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
        ({"temperature": 1.0, "top_p": -0.2}, "top_p"),
        ({"temperature": 1.0, "top_p": math.nan}, "top_p"),
        ({"temperature": 1.0, "top_k": -1}, "top_k"),
        ({"temperature": 1.0, "top_k": 2.5}, "top_k"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_validate_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        P(**kwargs).validate()


@pytest.mark.parametrize(
    "params", [P(), P(temperature=0.7, top_p=1.0, top_k=0), P(temperature=2, top_p=0.01, top_k=50, seed=-3)]
)
def test_validate_accepts(params):
    params.validate()


def test_greedy_flag():
    assert P().greedy and P(temperature=0.0, top_k=5).greedy
    assert not P(temperature=0.5).greedy


def test_generator_determinism():
    probs = torch.full((1, 1000), 1e-3)

    def draws(g):
        return [int(sample(probs, [g])) for _ in range(20)]

    assert P(seed=None).make_generator() is None
    assert draws(P(seed=5).make_generator()) == draws(P(seed=5).make_generator())
    assert draws(P(seed=5).make_generator(salt=0)) != draws(P(seed=5).make_generator(salt=1))
    assert draws(P(seed=5).make_generator()) != draws(P(seed=6).make_generator())
    # seed + salt is mixed, not added: (1, 0) and (0, 1) are different streams
    assert draws(P(seed=1).make_generator(0)) != draws(P(seed=0).make_generator(1))


def test_sample_row_independent_of_neighbours():
    probs = torch.softmax(torch.randn(6, 50, generator=torch.Generator().manual_seed(0)), -1)
    gens = [P(seed=i).make_generator() for i in range(6)]
    batched = sample(probs, gens)
    alone = [int(sample(probs[i : i + 1], [P(seed=i).make_generator()])) for i in range(6)]
    assert batched.tolist() == alone


# ---------------------------------------------------------------- logits_to_probs


def test_greedy_is_onehot_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [-5.0, -1.0, -2.0, -9.0]])
    probs = logits_to_probs(logits, [P(), P()])
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0]]))


def test_temperature():
    probs = logits_to_probs(torch.tensor([[0.0, math.log(2.0)]]), [P(temperature=0.5)])
    torch.testing.assert_close(probs, torch.tensor([[0.2, 0.8]]))


def test_top_k_ties_and_bounds():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    full = torch.softmax(logits, -1)

    def run(k):
        return logits_to_probs(logits, [P(temperature=1.0, top_k=k)])

    # both 3.0s are tied at the cut, so top_k 1 and 2 keep both
    torch.testing.assert_close(run(1), torch.tensor([[0, 0.5, 0, 0.5, 0]]))
    torch.testing.assert_close(run(2), torch.tensor([[0, 0.5, 0, 0.5, 0]]))
    expected3 = torch.where(logits >= 2.0, full, torch.zeros(())) / full[logits >= 2.0].sum()
    torch.testing.assert_close(run(3), expected3)
    for k in (0, 5, 6, 100):
        torch.testing.assert_close(run(k), full)


def test_top_k_1_is_argmax_without_ties():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    probs = logits_to_probs(logits, [P(temperature=1.3, top_k=1)] * 4)
    assert torch.equal(probs, logits_to_probs(logits, [P()] * 4))


def test_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()

    def run(top_p):
        return logits_to_probs(logits, [P(temperature=1.0, top_p=top_p)])

    torch.testing.assert_close(run(0.4), torch.tensor([[1.0, 0, 0]]))  # always >= the top token
    torch.testing.assert_close(run(0.01), torch.tensor([[1.0, 0, 0]]))
    torch.testing.assert_close(run(0.6), torch.tensor([[0.625, 0.375, 0]]))
    torch.testing.assert_close(run(0.9), torch.tensor([[0.5, 0.3, 0.2]]))


def test_top_p_one_keeps_far_tail():
    logits = torch.tensor([[0.0, 0.0, -30.0]])
    probs = logits_to_probs(logits, [P(temperature=1.0, top_p=1.0)])
    assert probs[0, 2] > 0
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


def test_top_p_ties_are_kept_together():
    logits = torch.tensor([[0.4, 0.3, 0.3, 0.0001]]).log()
    probs = logits_to_probs(logits, [P(temperature=1.0, top_p=0.5)])
    # smallest prefix is {0.4, 0.3}; its tied twin is kept too, so the set is sort-order independent
    torch.testing.assert_close(probs, torch.tensor([[0.4, 0.3, 0.3, 0.0]]), atol=1e-6, rtol=0)


def test_top_k_applied_before_top_p():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    probs = logits_to_probs(logits, [P(temperature=1.0, top_k=3, top_p=0.75)])
    # after top-k: [4/9, 3/9, 2/9]; 4/9 + 3/9 >= 0.75, so the third is cut
    torch.testing.assert_close(probs, torch.tensor([[4 / 7, 3 / 7, 0, 0]]))


def test_mixed_rows_match_single_rows_and_reference():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 40, generator=gen) * 3
    params = [P(), P(0.7), P(1.0, top_k=5), P(1.5, top_p=0.6), P(0.9, top_k=10, top_p=0.8), P(1.0, top_k=40)]
    batched = logits_to_probs(logits.half(), params)
    for i, p in enumerate(params):
        torch.testing.assert_close(batched[i : i + 1], logits_to_probs(logits[i : i + 1].half(), [p]))
        if not p.greedy:
            ref = ref_probs(logits[i].half().float().numpy(), p.temperature, p.top_k, p.top_p)
            np.testing.assert_allclose(batched[i].numpy(), ref, atol=1e-5)


# ---------------------------------------------------------------- sample


def test_sample_onehot_and_zero_mass():
    onehot = torch.eye(5)[[3, 0, 4]]
    for _ in range(5):
        assert sample(onehot, [None, None, None]).tolist() == [3, 0, 4]
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(2000, 5)
    torch.manual_seed(0)
    assert set(sample(probs, [None] * 2000).tolist()) == {1, 3}


def test_sample_distribution():
    p = mixed_dist(np.random.default_rng(0), 6)
    torch.manual_seed(1)
    out = sample(torch.tensor(p, dtype=torch.float32).expand(20000, 6), [None] * 20000)
    assert chi2_pvalue(out.numpy(), p) > ALPHA


# ---------------------------------------------------------------- verify_greedy


def test_verify_greedy_hand_made():
    v = 10
    draft = torch.tensor(
        [
            [1, 2, 3],  # all accepted -> bonus 4
            [1, 0, 3],  # mismatch at 1 -> correction 2
            [7, -1, 99],  # draft_lens 0: garbage ignored, just the target's token
            [1, 2, 0],  # len 2: padding equals the target's argmax but must not be accepted
            [3, 2, 3],  # mismatch at 0
            [5, 6, 0],  # len 1, accepted -> bonus from position 1
        ]
    )
    lens = torch.tensor([3, 3, 0, 2, 3, 1])
    targets = [[1, 2, 3, 4], [1, 2, 3, 4], [2, 0, 0, 0], [1, 2, 0, 4], [1, 2, 3, 4], [5, 8, 9, 9]]
    res = verify_greedy(draft, lens, onehot_logits(targets, v))
    assert res.num_accepted.dtype == torch.long
    assert res.num_accepted.tolist() == [3, 1, 0, 2, 0, 1]
    assert res.tokens == [[1, 2, 3, 4], [1, 2], [2], [1, 2, 0], [1], [5, 8]]


def test_verify_greedy_k0_and_bad_lens():
    no_drafts = torch.zeros(2, 0, dtype=torch.long)
    res = verify_greedy(no_drafts, torch.zeros(2, dtype=torch.long), onehot_logits([[4], [1]], 6))
    assert res.tokens == [[4], [1]] and res.num_accepted.tolist() == [0, 0]
    with pytest.raises(ValueError, match="draft_lens"):
        verify_greedy(torch.zeros(1, 2, dtype=torch.long), torch.tensor([3]), torch.zeros(1, 3, 5))


# ---------------------------------------------------------------- verify_rejection


def random_batch(b=64, k=4, v=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k + 1, v, generator=gen)
    best = logits.argmax(-1)
    # drafts mostly agree with the target so that acceptance runs are long
    wrong = torch.randint(0, v, (b, k), generator=gen)
    draft = torch.where(torch.rand(b, k, generator=gen) < 0.8, best[:, :k], wrong)
    lens = torch.randint(0, k + 1, (b,), generator=gen)
    pad = torch.arange(k) >= lens[:, None]
    draft = torch.where(pad, torch.full_like(draft, 12345), draft)  # out-of-range padding
    return draft, lens, logits


def test_rejection_with_onehot_p_is_greedy():
    draft, lens, logits = random_batch()
    b, k, v = draft.shape[0], draft.shape[1], logits.shape[-1]
    expected = verify_greedy(draft, lens, logits)
    assert 0 < expected.num_accepted.float().mean() < k  # the batch really mixes outcomes
    p = logits_to_probs(logits.flatten(0, 1), [P()] * (b * (k + 1))).view(b, k + 1, v)
    safe = draft.clamp(0, v - 1)
    onehot_q = torch.nn.functional.one_hot(safe, v).float()
    soft_q = torch.softmax(torch.randn(b, k, v, generator=torch.Generator().manual_seed(9)), -1)
    for q in (onehot_q, soft_q):
        q = torch.where((torch.arange(k) >= lens[:, None])[..., None], torch.full_like(q, math.nan), q)
        gens = [P(seed=i).make_generator() for i in range(b)]
        got = verify_rejection(draft, lens, q, p, gens)
        assert torch.equal(got.num_accepted, expected.num_accepted)
        assert got.tokens == expected.tokens


def test_rejection_seeded_is_reproducible():
    draft, lens, logits = random_batch(seed=3)
    p = torch.softmax(logits, -1)
    noise = torch.randn(draft.shape + (10,), generator=torch.Generator().manual_seed(4))
    q = torch.softmax(logits[:, :-1] + noise, -1)

    def run():
        return verify_rejection(draft, lens, q, p, [P(seed=i).make_generator(1) for i in range(len(lens))])

    assert run().tokens == run().tokens


def seeded_or_global(kind: str, b: int, salt: int) -> list:
    return [P(seed=i).make_generator(salt) for i in range(b)] if kind == "seeded" else [None] * b


@pytest.mark.parametrize("gens", ["global", "seeded"])
def test_first_token_is_distributed_as_target(gens):
    rng = np.random.default_rng(0)
    b, k, v = 40000, 3, 6
    # p0 gives token 5 no mass (always rejected if drafted); q0 never drafts token 0
    p = np.stack([mixed_dist(rng, v, zero=5)] + [mixed_dist(rng, v) for _ in range(k)])
    q = np.stack([mixed_dist(rng, v, zero=0)] + [mixed_dist(rng, v) for _ in range(k - 1)])
    target = torch.tensor(p, dtype=torch.float32).expand(b, k + 1, v)
    drafts = torch.tensor(q, dtype=torch.float32).expand(b, k, v)
    torch.manual_seed(0)
    draft = torch.stack([sample(drafts[:, i], [None] * b) for i in range(k)], 1)
    lens = torch.randint(0, k + 1, (b,))
    res = verify_rejection(draft, lens, drafts, target, seeded_or_global(gens, b, 1))

    first = np.array([t[0] for t in res.tokens])
    assert chi2_pvalue(first, p[0]) > ALPHA
    # acceptance of the first draft token happens with probability sum(min(p0, q0))
    has_draft = (lens > 0).numpy()
    accepted = int((res.num_accepted[lens > 0] > 0).sum())
    assert stats.binomtest(accepted, int(has_draft.sum()), np.minimum(p[0], q[0]).sum()).pvalue > ALPHA
    assert all(len(t) == n + 1 for t, n in zip(res.tokens, res.num_accepted.tolist()))


@pytest.mark.parametrize("gens", ["global", "seeded"])
def test_first_two_tokens_follow_the_conditional_target(gens):
    """Position-1 target/draft distributions depend on the token at position 0, as they do in a
    real model. The joint of the first two emitted tokens must be p0(x) * p1(y | x); when a step
    emits only one token, the second comes from a further step conditioned on that token."""
    rng = np.random.default_rng(1)
    b, k, v = 40000, 2, 6
    p0, q0 = mixed_dist(rng, v, zero=2), mixed_dist(rng, v, zero=4)
    p1 = np.stack([mixed_dist(rng, v, zero=(x + 1) % v) for x in range(v)])  # p1[x] = p(. | x)
    q1 = np.stack([mixed_dist(rng, v) for _ in range(v)])
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    uniform = torch.full((b, v), 1.0 / v)

    torch.manual_seed(1)
    x1 = sample(t(q0).expand(b, v), [None] * b)
    x2 = sample(t(q1)[x1], [None] * b)
    lens = torch.randint(0, k + 1, (b,))
    target = torch.stack([t(p0).expand(b, v), t(p1)[x1], uniform], 1)
    drafts = torch.stack([t(q0).expand(b, v), t(q1)[x1]], 1)
    res = verify_rejection(torch.stack([x1, x2], 1), lens, drafts, target, seeded_or_global(gens, b, 1))

    short = [i for i, toks in enumerate(res.tokens) if len(toks) == 1]
    y = torch.tensor([res.tokens[i][0] for i in short])
    nxt = sample(t(q1)[y], [None] * len(short))
    res2 = verify_rejection(nxt[:, None], torch.ones(len(short), dtype=torch.long), t(q1)[y][:, None],
                            torch.stack([t(p1)[y], uniform[: len(short)]], 1), seeded_or_global(gens, len(short), 2))
    second = {i: toks[1] for i, toks in enumerate(res.tokens) if len(toks) > 1}
    second.update({i: toks[0] for i, toks in zip(short, res2.tokens)})

    pairs = np.array([res.tokens[i][0] * v + second[i] for i in range(b)])
    assert chi2_pvalue(pairs, (p0[:, None] * p1).ravel()) > ALPHA
    assert 0.2 < len(short) / b < 0.9  # both paths are well exercised


def test_processed_target_is_matched_through_verify():
    """Top-k / top-p / temperature shape the target; the drafter proposes from the untruncated
    distribution, so masked tokens get drafted and must always be rejected."""
    b, k, v = 30000, 1, 8
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.5, 0.0, -0.5, -1.0])
    target_logits = logits.expand(b, k + 1, v).contiguous()
    q = torch.softmax(torch.randn(v, generator=torch.Generator().manual_seed(5)), -1).expand(b, k, v).contiguous()
    params = [P(temperature=0.8, top_k=5, top_p=0.8, seed=i) for i in range(b)]
    expected = ref_probs(logits.numpy(), 0.8, 5, 0.8)
    # both cuts bite: top-p alone would keep 4 tokens, top-k then top-p keeps 3
    assert (expected > 0).sum() == 3 and (ref_probs(logits.numpy(), 0.8, 0, 0.8) > 0).sum() == 4

    draft = sample(q[:, 0], [p.make_generator(salt=0) for p in params])[:, None]
    res = verify(draft, torch.ones(b, dtype=torch.long), target_logits, q, params,
                 [p.make_generator(salt=1) for p in params])
    assert chi2_pvalue(np.array([t[0] for t in res.tokens]), expected) > ALPHA


# ---------------------------------------------------------------- verify (entry point)


def test_verify_mixed_batch():
    draft, lens, logits = random_batch(b=12, k=4, v=10, seed=7)
    b, k, v = 12, 4, 10
    params = [P() if i % 3 == 0 else P(temperature=0.9, top_k=7, top_p=0.9, seed=100 + i) for i in range(b)]
    q = torch.softmax(torch.randn(b, k, v, generator=torch.Generator().manual_seed(8)), -1)
    greedy = [i for i in range(b) if params[i].greedy]
    sampled = [i for i in range(b) if not params[i].greedy]
    q[greedy] = math.nan  # a greedy row's draft probs are never read
    gens = lambda rows: [params[i].make_generator(1) if i in rows else None for i in range(b)]  # noqa: E731

    res = verify(draft, lens, logits, q, params, gens(sampled))
    g = verify_greedy(draft[greedy], lens[greedy], logits[greedy])
    target_p = logits_to_probs(logits[sampled].flatten(0, 1), [params[i] for i in sampled for _ in range(k + 1)])
    s = verify_rejection(draft[sampled], lens[sampled], q[sampled], target_p.view(len(sampled), k + 1, v),
                         [params[i].make_generator(1) for i in sampled])
    assert [res.tokens[i] for i in greedy] == g.tokens
    assert [res.tokens[i] for i in sampled] == s.tokens
    assert res.num_accepted[greedy].tolist() == g.num_accepted.tolist()
    assert res.num_accepted[sampled].tolist() == s.num_accepted.tolist()
    assert all(len(res.tokens[i]) == n + 1 for i, n in enumerate(res.num_accepted.tolist()))


def test_verify_draft_probs_optional_only_when_all_greedy():
    draft, lens, logits = random_batch(b=4, k=2, v=10, seed=11)
    res = verify(draft, lens, logits, None, [P()] * 4, [None] * 4)
    assert res.tokens == verify_greedy(draft, lens, logits).tokens
    with pytest.raises(ValueError, match="draft_probs"):
        verify(draft, lens, logits, None, [P(), P(1.0), P(), P()], [None] * 4)
    with pytest.raises(ValueError):
        verify(draft, lens, logits, None, [P()] * 3, [None] * 4)


# ---------------------------------------------------------------- compact draft distributions (large vocabularies)


def test_compact_keeps_the_top_support_renormalised_and_packs_losslessly():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0]])
    q = compact(probs, 2)
    assert q.ids[0].tolist() == [0, 2] and q.ids[1, 0] == 2  # the second row's padding slot has probability 0
    assert torch.allclose(q.probs, torch.tensor([[0.625, 0.375], [1.0, 0.0]]))
    full = compact(probs, 10)  # never wider than the widest support
    assert full.width == 3 and torch.allclose(full.dense(4), probs)
    back = SparseProbs.unpack(q.pack())
    assert torch.equal(back.ids, q.ids) and torch.equal(back.probs, q.probs)
    assert torch.allclose(q.at(torch.tensor([2, 3])), torch.tensor([0.375, 0.0]))
    with pytest.raises(ValueError):
        SparseProbs.unpack(torch.zeros(2, 3, 4))


def head_and_tail(rng, v: int, head: int, head_mass: float) -> np.ndarray:
    d = np.full(v, (1 - head_mass) / (v - head))
    idx = rng.permutation(v)[:head]
    d[idx] = head_mass * rng.dirichlet(np.ones(head) * 5)
    return d / d.sum()


def binned(tokens: np.ndarray, p: np.ndarray, min_expected: float) -> tuple[np.ndarray, np.ndarray]:
    """Cells for a chi-square at a large vocabulary: each token likely enough to fill its cell on its own, the rest
    grouped (in id order) into cells of about 20 x min_expected expected draws."""
    n = len(tokens)
    single = np.nonzero(p * n >= min_expected)[0]
    rest = np.setdiff1d(np.arange(len(p)), single)
    groups = np.array_split(rest, max(1, int(p[rest].sum() * n // (20 * min_expected))))
    cell = np.empty(len(p), dtype=np.int64)
    cell[single] = np.arange(len(single))
    for g, members in enumerate(groups):
        cell[members] = len(single) + g
    expected = np.bincount(cell, weights=p, minlength=len(single) + len(groups))
    return cell[tokens], expected


def test_compact_draft_keeps_rejection_sampling_exact_at_a_large_vocabulary():
    """The drafter draws from (and ships) its distribution's top S tokens only: 20% of q's mass is cut off. The
    emitted token still follows the target p exactly, tail included (the residual max(0, p - q) supplies what the
    truncated draft never proposes), at a 16k vocabulary; acceptance is sum(min(p, q')) for the truncated q'."""
    rng = np.random.default_rng(3)
    v, s, k, b, chunk = 16384, 256, 2, 16000, 4000
    p = np.stack([head_and_tail(rng, v, 120, 0.6) for _ in range(k + 1)])
    q_dense = torch.tensor(np.stack([head_and_tail(rng, v, s, 0.8) for _ in range(k)]), dtype=torch.float32)
    q = compact(q_dense, s)  # [k, S]: the head only, renormalised
    assert q.width == s and abs(float(q_dense.topk(s).values.sum(-1).mean()) - 0.8) < 0.02
    torch.manual_seed(0)
    firsts, accepted, has_draft = [], 0, 0
    target = torch.tensor(p, dtype=torch.float32)
    for start in range(0, b, chunk):
        n = min(chunk, b - start)
        dist = SparseProbs(q.ids.expand(n, k, s), q.probs.expand(n, k, s))
        draft = torch.stack([sample_sparse(dist[:, i], [None] * n) for i in range(k)], 1)
        lens = torch.randint(0, k + 1, (n,))
        res = verify_rejection(draft, lens, dist, target.expand(n, k + 1, v), [None] * n)
        firsts.append(np.array([t[0] for t in res.tokens]))
        accepted += int((res.num_accepted[lens > 0] > 0).sum())
        has_draft += int((lens > 0).sum())
    first = np.concatenate(firsts)
    cells, expected = binned(first, p[0], min_expected=20)
    assert stats.chisquare(np.bincount(cells, minlength=len(expected)), expected * len(first)).pvalue > ALPHA
    q0 = q.dense(v)[0].numpy()
    assert stats.binomtest(accepted, has_draft, np.minimum(p[0], q0).sum()).pvalue > ALPHA


# ---------------------------------------------------------------- confidence-stopped drafts


def peaked(rng, v: int, top: float) -> np.ndarray:
    d = mixed_dist(rng, v) * (1 - top)
    d[rng.integers(v)] += top
    return d / d.sum()


@pytest.mark.parametrize("rule, lossless", [("stopping time", True), ("sampled token's own probability", False)])
def test_confidence_stopped_drafts_keep_the_target_distribution(rule, lossless):
    """FlexDraft's rule: draft position j only while the running product of confidences stays >= tau, so the draft
    length depends on the drafts. Rejection sampling stays exact when that decision is a stopping time of the draft
    process: whether position j is drafted is decided from what is known before its token is drawn (the top
    probability of q_j, and the tokens before it). Every position then yields a token distributed as the target's
    conditional: a drafted one via accept-or-residual, an undrafted one as the bonus from p, and which of the two
    happens is independent of the token that would have been drawn. The rule minedraft uses (speculative.propose).

    Deciding from the sampled token's own probability instead is not a stopping time: keeping a draft only when q(d)
    is high means the proposal is q restricted to likely tokens, while the verifier judges by q, and the output is
    biased. The second case shows that this test detects exactly that."""
    rng = np.random.default_rng(7)
    b, k, v, tau = 40000, 2, 6, 0.3
    p0, q0 = mixed_dist(rng, v), peaked(rng, v, 0.5)
    p1 = np.stack([mixed_dist(rng, v) for _ in range(v)])
    q1 = np.stack([peaked(rng, v, 0.8 if x % 2 else 0.1) for x in range(v)])  # confident after odd tokens only
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    uniform = torch.full((b, v), 1.0 / v)

    torch.manual_seed(3)
    x1 = sample(t(q0).expand(b, v), [None] * b)
    x2 = sample(t(q1)[x1], [None] * b)
    if lossless:  # the first draft always; the second iff max q0 * max q1[x1] >= tau
        lens = 1 + (t(q1)[x1].max(-1).values * q0.max() >= tau).long()
    else:  # keep the leading drafts whose own probabilities' product stays >= tau (possibly none)
        c1 = t(q0)[x1]
        c2 = c1 * t(q1)[x1].gather(1, x2[:, None]).squeeze(1)
        lens = (c1 >= tau).long() + ((c1 >= tau) & (c2 >= tau)).long()
    target = torch.stack([t(p0).expand(b, v), t(p1)[x1], uniform], 1)
    drafts = torch.stack([t(q0).expand(b, v), t(q1)[x1]], 1)
    res = verify_rejection(torch.stack([x1, x2], 1), lens, drafts, target, [None] * b)

    short = [i for i, toks in enumerate(res.tokens) if len(toks) == 1]
    y = torch.tensor([res.tokens[i][0] for i in short])
    res2 = verify_rejection(sample(t(q1)[y], [None] * len(short))[:, None], torch.ones(len(short), dtype=torch.long),
                            t(q1)[y][:, None], torch.stack([t(p1)[y], uniform[: len(short)]], 1),
                            [None] * len(short))
    second = {i: toks[1] for i, toks in enumerate(res.tokens) if len(toks) > 1}
    second.update({i: toks[0] for i, toks in zip(short, res2.tokens)})
    pairs = np.array([res.tokens[i][0] * v + second[i] for i in range(b)])
    counts = lens.bincount(minlength=k + 1).tolist()
    assert sum(c > b // 10 for c in counts) >= 2, counts  # the rule really varies the draft length
    pvalue = chi2_pvalue(pairs, (p0[:, None] * p1).ravel())
    assert (pvalue > ALPHA) if lossless else (pvalue < 1e-9), pvalue
