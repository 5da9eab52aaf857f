"""Our forward and KV cache against transformers, for every supported family: logits, batched mixed lengths,
rollback, and greedy decoding (target-only and speculative) token for token against `generate(do_sample=False)`."""

import pytest
import torch

from hf_tiny import FAMILIES, make_checkpoint, make_noisy_copy
from minedraft.runtime.checkpoint import load_model
from minedraft.runtime.reference import generate, make_sequences
from minedraft.runtime.runner import Extend, ModelRunner
from minedraft.runtime.sampling import SamplingParams

VOCAB = 97


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(request.param, path)
    return request.param, hf, path


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1)
    return out[0, len(prompt):].tolist()


def test_logits_match_transformers(family):
    _, hf, path = family
    runner = ModelRunner(load_model(path), 2048, block_size=8)
    (ids,) = prompts_of([50])
    ours = runner.step([Extend("a", 0, ids, all_logits=True)])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_mixed_lengths_in_one_batch_and_rollback(family):
    _, hf, path = family
    runner = ModelRunner(load_model(path), 2048, block_size=8)
    prompts = prompts_of([5, 33, 17])
    # Prefill all three in one step, then append different counts per sequence, including a rewind.
    runner.step([Extend(f"s{i}", 0, p) for i, p in enumerate(prompts)])
    junk = prompts_of([6], seed=9)[0]
    runner.step([Extend("s1", len(prompts[1]), junk)])  # s1 grows by junk that we then roll back over
    extra = prompts_of([3, 1, 4], seed=3)
    outs = runner.step([Extend(f"s{i}", len(p), e, all_logits=True) for i, (p, e) in enumerate(zip(prompts, extra))])
    for p, e, ours in zip(prompts, extra, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([p + e])).logits[0, len(p):]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_hf_generate(family, tmp_path):
    _, hf, path = family
    target = ModelRunner(load_model(path), 4096, block_size=8)
    draft_path = tmp_path / "draft"
    make_noisy_copy(hf, draft_path, noise=0.3)
    draft = ModelRunner(load_model(draft_path), 4096, block_size=8)
    prompts, budgets = prompts_of([3, 21, 40, 9]), [24, 5, 30, 12]
    expected = [hf_greedy(hf, p, n) for p, n in zip(prompts, budgets)]
    greedy = SamplingParams()
    ar = generate(target, make_sequences(prompts, greedy, budgets, 256, ignore_eos=True))
    assert [s.output for s in ar] == expected
    for k in (1, 4):
        sd = generate(target, make_sequences(prompts, greedy, budgets, 256, ignore_eos=True), draft=draft, k=k)
        assert [s.output for s in sd] == expected, f"k={k}"
        accepted, drafted = sum(s.accepted for s in sd), sum(s.drafted for s in sd)
        assert 0 < accepted < drafted, "the noisy draft should exercise both acceptance and rejection"
    # Confidence-stopped drafts (shorter and of varying length per sequence and step) change nothing either.
    sd = generate(target, make_sequences(prompts, greedy, budgets, 256, ignore_eos=True), draft=draft, k=6,
                  min_confidence=0.5)
    assert [s.output for s in sd] == expected
    assert sum(s.drafted for s in sd) < 6 * sum(s.verify_steps - 1 for s in sd)  # some drafts were cut short
    assert target.cache.used_blocks == 0 and draft.cache.used_blocks == 0


def test_self_draft_accepts_everything_and_catches_up(family):
    """Draft == target: every draft is accepted, so every round exercises the drafter's two-token catch-up."""
    _, hf, path = family
    target = ModelRunner(load_model(path), 4096, block_size=8)
    draft = ModelRunner(load_model(path), 4096, block_size=8)
    prompts = prompts_of([7, 12])
    expected = [hf_greedy(hf, p, 21) for p in prompts]
    sd = generate(target, make_sequences(prompts, SamplingParams(), 21, 256, ignore_eos=True), draft=draft, k=4)
    assert [s.output for s in sd] == expected
    assert all(s.accepted == s.drafted > 0 for s in sd)


@pytest.mark.parametrize("sampled", [False, True])
def test_verify_reads_the_rows_after_a_reprefill(family, sampled):
    """A verifier that lost a sequence (restart) re-prefills it with its drafts in one step: acceptance must read the
    rows that predict the drafts (the last n+1), not the first rows of the step."""
    from minedraft.runtime.speculative import VerifyRequest, verify_batch

    _, _, path = family
    model = load_model(path)
    prompt, drafts = prompts_of([30])[0], prompts_of([4], seed=5)[0]
    params = SamplingParams(temperature=0.9, seed=7) if sampled else SamplingParams()
    q = torch.full((4, VOCAB), 1.0 / VOCAB) if sampled else None
    warm = ModelRunner(model, 4096, block_size=8)
    first = verify_batch(warm, [VerifyRequest("s", 0, prompt, [], None, params, params.make_generator())]).tokens[0]
    cached = verify_batch(warm, [VerifyRequest("s", len(prompt), first, drafts, q, params,
                                               params.make_generator())])
    cold = ModelRunner(model, 4096, block_size=8)
    again = verify_batch(cold, [VerifyRequest("s", 0, prompt + first, drafts, q, params, params.make_generator())])
    assert again.tokens == cached.tokens and again.num_accepted.tolist() == cached.num_accepted.tolist()
