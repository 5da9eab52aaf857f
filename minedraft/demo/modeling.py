"""The demo models, their losses and the one training loop (see :mod:`minedraft.demo.train`).

Everything that runs a model while training the pair lives here, independent of the
command line: the two shapes and their ``LlamaConfig``; AdamW + warmup/cosine; the LM loss
and the distillation loss (one KD loss: KL(target || draft) and the draft's CE, optionally
restricted to a mask of positions); :func:`fit`, the single optimisation loop every phase
uses (a phase only says where its batches come from and which named losses a batch gives);
batch sources for packed windows and for the target's generations; greedy generation,
held-out validation and the step-time calibration behind ``--minutes-*``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

log = logging.getLogger(__name__)

TARGET_DIR = "demo-target"
DRAFT_DIR = "demo-draft"

TARGET_ARCH = dict(
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=768,
)
DRAFT_ARCH = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=384,
)


# --------------------------------------------------------------------------- models


def make_config(arch: dict, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
        **arch,
    )


def make_model(arch: dict, vocab_size: int, eos_id: int, seed: int):
    """A freshly initialised ``LlamaForCausalLM``; seeds torch's global RNG first."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(make_config(arch, vocab_size, eos_id))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW (betas 0.9/0.95); no weight decay on 1-d parameters (norms)."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )


def lr_at(step: int, total: int, peak: float, warmup_frac: float, final_frac: float = 0.1):
    """Linear warmup over ``warmup_frac`` of ``total`` steps, then cosine to ``final_frac``."""
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _autocast(enabled: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


# --------------------------------------------------------------------------- losses


def lm_loss(model, x, autocast: bool):
    """Next-token CE of ``model`` on windows ``x``."""
    import torch.nn.functional as F

    with _autocast(autocast):
        logits = model(input_ids=x).logits
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


def kd_losses(draft, target, x, autocast: bool, temperature: float, mask=None):
    """``(KL(target||draft) per token, CE of draft)`` on ``x``.

    Averaged over every next-token position, or only over those where ``mask``
    (``[batch, len - 1]`` bool, position ``i`` scores token ``i + 1``) is true; with
    right padding the padded positions are harmless under causal attention.
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad(), _autocast(autocast):
        t_logits = target(input_ids=x).logits
    with _autocast(autocast):
        d_logits = draft(input_ids=x).logits
    V = d_logits.size(-1)
    t = t_logits[:, :-1].float().reshape(-1, V)
    d = d_logits[:, :-1].float().reshape(-1, V)
    y = x[:, 1:].reshape(-1)
    if mask is not None:
        m = mask.reshape(-1)
        t, d, y = t[m], d[m], y[m]
    T = temperature
    kl = F.kl_div(F.log_softmax(d / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="batchmean") * (T * T)
    ce = F.cross_entropy(d, y)
    return kl, ce


# --------------------------------------------------------------------------- the loop


def fit(model, opt, steps: int, batches: Callable, loss_fn: Callable, weights: dict,
        peak_lr: float, *, warmup_frac: float, log_every: int, desc: str) -> dict:
    """Train ``model`` for ``steps`` steps; returns the phase's report.

    Each step: set the lr (:func:`lr_at` with ``peak_lr``), ``loss_fn(batches(step))`` gives
    the named losses (e.g. ``{"kl": ..., "ce": ...}``), the objective is
    ``sum(weights[name] * loss)`` (in ``weights`` order), then backward, clip the grad norm
    to 1, step, zero the grads. Every name in ``weights`` is tracked as an EMA (0.95) shown
    on the progress bar and recorded in ``history`` every ``log_every`` steps and at the
    last one. Report: ``steps``, ``wall_s``, ``final_train_<name>_ema`` per name (None when
    no step ran), ``history``.
    """
    import torch
    from tqdm import tqdm

    model.train()
    ema: dict[str, float | None] = dict.fromkeys(weights)
    hist = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=5)
    for step in bar:
        lr = lr_at(step, steps, peak_lr, warmup_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        losses = loss_fn(batches(step))
        loss = None
        for name, w in weights.items():
            term = w * losses[name]
            loss = term if loss is None else loss + term
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for name in weights:
            v = losses[name].item()
            ema[name] = v if ema[name] is None else 0.95 * ema[name] + 0.05 * v
        bar.set_postfix(**{k: f"{v:.3f}" for k, v in ema.items()}, lr=f"{lr:.2e}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            hist.append({"step": step + 1, **{k: round(v, 4) for k, v in ema.items()}})
    bar.close()
    wall = time.perf_counter() - t0
    return {"steps": steps, "wall_s": round(wall, 1),
            **{f"final_train_{k}_ema": None if v is None else round(v, 4)
               for k, v in ema.items()},
            "history": hist}


def window_batches(windows, batch_size: int) -> Callable:
    """Step ``s`` -> windows ``s*B .. (s+1)*B - 1`` (cycling through ``windows``)."""
    import torch

    def at(step: int):
        idx = torch.arange(step * batch_size, (step + 1) * batch_size) % len(windows)
        return windows[idx]

    return at


def make_gen_batches(prompts, conts, pad_id: int):
    """Right-padded ``(ids, loss_mask)`` of prompt+continuation; mask marks the positions
    whose next token is a continuation token (what the draft is scored on)."""
    import torch

    seqs = [p + c for p, c in zip(prompts, conts)]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L - 1), dtype=torch.bool)
    for j, (p, c) in enumerate(zip(prompts, conts)):
        ids[j, :len(p) + len(c)] = torch.tensor(p + c)
        mask[j, len(p) - 1:len(p) + len(c) - 1] = True
    return ids, mask


def generation_batches(prompts, conts, batch_size: int, pad_id: int, seed: int) -> Callable:
    """Batches of ``(ids, mask)`` (:func:`make_gen_batches`) over epochs of seeded random
    permutations of the (prompt, continuation) pairs; call it once per step, in order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def at(step: int):
        nonlocal order
        while len(order) < batch_size:
            order += torch.randperm(len(prompts), generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        return make_gen_batches([prompts[i] for i in idx], [conts[i] for i in idx], pad_id)

    return at


def calibrate_steps(step_fn, minutes: float, label: str, n: int = 3) -> int:
    """Time ``n`` steps of a throwaway model and convert a minute budget into steps."""
    step_fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn()
    per = (time.perf_counter() - t0) / n
    steps = max(1, int(minutes * 60 / per))
    log.info("%s calibration: %.3f s/step -> %d steps for %.1f min", label, per, steps, minutes)
    return steps


# --------------------------------------------------------------------------- inference


def generate_greedy(target, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                    batch_size: int = 32) -> list[list[int]]:
    """Target greedy continuations (fp32, KV cache, left padding), each stopping at eos."""
    import torch
    from tqdm import tqdm

    target.eval()
    outs: list[list[int]] = []
    bar = tqdm(total=len(prompts), desc="target greedy generations", unit="prompt",
               mininterval=5)
    with torch.no_grad():
        for b in range(0, len(prompts), batch_size):
            chunk = prompts[b:b + batch_size]
            L = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), L), eos_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for j, p in enumerate(chunk):
                ids[j, L - len(p):] = torch.tensor(p)
                mask[j, L - len(p):] = 1
            gen = target.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                  pad_token_id=eos_id)
            for row in gen[:, L:].tolist():
                cont = []
                for t in row:
                    cont.append(t)
                    if t == eos_id:
                        break
                outs.append(cont)
            bar.update(len(chunk))
    bar.close()
    return outs


def validate(target, draft, val, autocast: bool):
    """Held-out per-token CE of both models, KL(target||draft) and greedy top-1 agreement.

    Sums over all tokens of ``val`` (batches of 8) and divides once, so it is not
    :func:`kd_losses` (a per-batch mean with a temperature) but its evaluation twin.
    """
    import torch
    import torch.nn.functional as F

    target.eval()
    draft.eval()
    tot = {"target_ce": 0.0, "draft_ce": 0.0, "kl": 0.0, "top1_agree": 0.0}
    n = 0
    with torch.no_grad():
        for i in range(0, len(val), 8):
            x = val[i:i + 8]
            with _autocast(autocast):
                t = target(input_ids=x).logits[:, :-1].float()
                d = draft(input_ids=x).logits[:, :-1].float()
            V = t.size(-1)
            y = x[:, 1:].reshape(-1)
            t2, d2 = t.reshape(-1, V), d.reshape(-1, V)
            m = y.numel()
            tot["target_ce"] += F.cross_entropy(t2, y, reduction="sum").item()
            tot["draft_ce"] += F.cross_entropy(d2, y, reduction="sum").item()
            tot["kl"] += F.kl_div(F.log_softmax(d2, -1), F.log_softmax(t2, -1), log_target=True,
                                  reduction="sum").item()
            tot["top1_agree"] += (t2.argmax(-1) == d2.argmax(-1)).sum().item()
            n += m
    return {k: round(v / n, 4) for k, v in tot.items()} | {"tokens": n}
