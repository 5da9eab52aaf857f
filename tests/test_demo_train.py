"""Fast checks of minedraft.demo.modeling: the one training loop and the one KD loss.

Tiny random models (vocab 32, one layer), no dataset, no tokenizer: a few seconds on CPU.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from minedraft.demo import modeling as m  # noqa: E402

V = 32
TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=32)


def _pair():
    return m.make_model(TINY, V, 0, seed=1), m.make_model(TINY, V, 0, seed=2)


def _x(n=3, L=10, seed=0):
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("autocast", [False, True])
def test_kd_all_true_mask_is_the_unmasked_loss(autocast):
    draft, target = _pair()
    x = _x()
    kl, ce = m.kd_losses(draft, target, x, autocast, 2.0)
    (kl + ce).backward()
    grads = [p.grad.clone() for p in draft.parameters()]
    draft.zero_grad(set_to_none=True)
    mask = torch.ones(x.shape[0], x.shape[1] - 1, dtype=torch.bool)
    kl_m, ce_m = m.kd_losses(draft, target, x, autocast, 2.0, mask=mask)
    (kl_m + ce_m).backward()
    assert torch.equal(kl, kl_m) and torch.equal(ce, ce_m)
    for g, p in zip(grads, draft.parameters()):
        assert torch.equal(g, p.grad)


def test_kd_mask_averages_over_the_masked_positions():
    import torch.nn.functional as F

    draft, target = _pair()
    x = _x()
    mask = torch.zeros(x.shape[0], x.shape[1] - 1, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[2, 7:] = True
    _, ce = m.kd_losses(draft, target, x, False, 1.0, mask=mask)
    with torch.no_grad():
        d = draft(input_ids=x).logits[:, :-1]
    want = F.cross_entropy(d[mask], x[:, 1:][mask])
    assert torch.allclose(ce, want, atol=1e-6)


def test_fit_is_the_reference_loop():
    """fit() == the loop train_target used to spell out (lr schedule, clip, EMA, history)."""
    windows = _x(n=7, L=9, seed=3)
    steps, B, peak, warm, log_every = 5, 2, 1e-2, 0.3, 2
    a = m.make_model(TINY, V, 0, seed=4)
    b = m.make_model(TINY, V, 0, seed=4)

    opt = m.make_optimizer(a, peak, 0.1)
    report = m.fit(a, opt, steps, m.window_batches(windows, B),
                   lambda x: {"loss": m.lm_loss(a, x, False)}, {"loss": 1.0}, peak,
                   warmup_frac=warm, log_every=log_every, desc="test")

    opt = m.make_optimizer(b, peak, 0.1)
    b.train()
    ema, hist = None, []
    for step in range(steps):
        lr = m.lr_at(step, steps, peak, warm)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.arange(step * B, (step + 1) * B) % len(windows)
        loss = m.lm_loss(b, windows[idx], False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        v = loss.item()
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        if (step + 1) % log_every == 0 or step + 1 == steps:
            hist.append({"step": step + 1, "loss": round(ema, 4)})

    assert list(report) == ["steps", "wall_s", "final_train_loss_ema", "history"]
    assert report["steps"] == steps and report["history"] == hist
    assert report["final_train_loss_ema"] == round(ema, 4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_fit_on_generation_batches_reports_kl_and_ce():
    draft, target = _pair()
    target.eval()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    conts = [[11, 12], [13, 14, 15], [16], [17, 18, 0]]
    batches = m.generation_batches(prompts, conts, 3, 0, seed=5)
    opt = m.make_optimizer(draft, 1e-3, 0.1)

    def losses(xm):
        kl, ce = m.kd_losses(draft, target, xm[0], False, 1.0, mask=xm[1])
        return {"kl": kl, "ce": ce}

    report = m.fit(draft, opt, 3, batches, losses, {"kl": 0.5, "ce": 0.5}, 1e-3,
                   warmup_frac=0.03, log_every=2, desc="test")
    assert list(report) == ["steps", "wall_s", "final_train_kl_ema", "final_train_ce_ema",
                            "history"]
    assert [h["step"] for h in report["history"]] == [2, 3]
    assert list(report["history"][0]) == ["step", "kl", "ce"]
    # the batch source walks seeded permutations: 3 steps x 3 = 9 draws = 2 full epochs + 1
    again = m.generation_batches(prompts, conts, 3, 0, seed=5)
    g = torch.Generator().manual_seed(5)
    order = sum((torch.randperm(4, generator=g).tolist() for _ in range(3)), [])
    for step in range(3):
        want = order[step * 3:(step + 1) * 3]
        ids, mask = again(step)
        want_ids, want_mask = m.make_gen_batches([prompts[i] for i in want],
                                                 [conts[i] for i in want], 0)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)


def test_empty_fit_reports_none():
    model = m.make_model(TINY, V, 0, seed=6)
    report = m.fit(model, m.make_optimizer(model, 1e-3, 0.0), 0, None, None,
                   {"kl": 0.5, "ce": 0.5}, 1e-3, warmup_frac=0.03, log_every=1, desc="test")
    assert report["final_train_kl_ema"] is None and report["history"] == []
