"""Train the demo target/draft pair (byte-level BPE tokenizer + two tiny Llamas).

    python -m minedraft.demo.train --out models [--seed 0] [--threads N]
        [--target-steps S | --minutes-target M] [--draft-steps S | --minutes-draft M]

Steps: (1) byte-level BPE tokenizer (vocab 4096, specials ``<|endoftext|>`` (eos = bos =
pad), ``<|user|>``, ``<|assistant|>``) trained on ShareGPT chat text; (2) a ~5.8M-param
target ``LlamaForCausalLM`` trained with AdamW + cosine on packed 256-token windows;
(3) a ~0.9M-param draft distilled from the target (KL to the target's logits mixed with
the LM loss); (4) both saved in bf16 safetensors with tokenizer files, then measured with
:mod:`minedraft.demo.evaluate` (greedy acceptance, forward timings) into
``<out>/demo-pair.json`` and ``<out>/README.md``.

Everything is deterministic from ``--seed`` for a fixed step count and thread count.
``--minutes-*`` derive a step count from a short timing calibration (so the result
then depends on the machine); the chosen counts are logged and recorded in
``demo-pair.json`` so ``--target-steps/--draft-steps`` reproduce the run exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

log = logging.getLogger("minedraft.demo.train")

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

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}<|endoftext|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# --------------------------------------------------------------------------- args


def parse_arch(text: str) -> dict:
    """``k=v,...`` over DRAFT_ARCH's keys, so a typo fails at parse time, not after an hour."""
    arch = dict(DRAFT_ARCH)
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        if key not in DRAFT_ARCH or not value.isdigit():
            raise argparse.ArgumentTypeError(
                f"bad draft arch item {item!r}; keys: {', '.join(DRAFT_ARCH)}")
        arch[key] = int(value)
    return arch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minedraft.demo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output dir (e.g. models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch/tokenizers threads")
    p.add_argument("--source", default="auto", choices=["auto", "sharegpt", "stdlib"])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer-chars", type=int, default=8_000_000,
                   help="characters of training text used to fit the BPE merges")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-doc-tokens", type=int, default=1024,
                   help="truncate each conversation to this many tokens (more, shorter docs)")
    p.add_argument("--target-steps", type=int, default=900)
    p.add_argument("--draft-steps", type=int, default=500)
    p.add_argument("--draft-arch", type=parse_arch, default=None, metavar="K=V,...",
                   help="draft shape overrides, e.g. hidden_size=192,num_hidden_layers=4,"
                        "num_attention_heads=3 (default: the committed demo draft's shape); "
                        "a second draft size varies T_draft/T_verify for the benchmark")
    p.add_argument("--minutes-target", type=float, default=None,
                   help="wall-clock budget for the target; overrides --target-steps via a "
                        "timing calibration")
    p.add_argument("--minutes-draft", type=float, default=None,
                   help="wall-clock budget for the draft; overrides --draft-steps")
    p.add_argument("--target-lr", type=float, default=2e-3)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.03)
    p.add_argument("--kd-alpha", type=float, default=0.9,
                   help="draft loss = alpha*KL(target||draft) + (1-alpha)*CE")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--gen-prompts", type=int, default=1024,
                   help="draft phase 2: number of training prompts the target continues greedily")
    p.add_argument("--gen-max-prompt-tokens", type=int, default=192)
    p.add_argument("--gen-max-new-tokens", type=int, default=128)
    p.add_argument("--gen-batch-size", type=int, default=32)
    p.add_argument("--gen-steps", type=int, default=200,
                   help="draft phase 2 steps (0 disables phase 2)")
    p.add_argument("--gen-lr", type=float, default=1e-3)
    p.add_argument("--gen-kd-alpha", type=float, default=0.5,
                   help="phase-2 loss = alpha*KL + (1-alpha)*CE on the target's greedy tokens")
    p.add_argument("--target-from", type=Path, default=None,
                   help="reuse a target (and its tokenizer) saved by an earlier run of this "
                        "script instead of training one; the full pipeline rounds the target "
                        "to --save-dtype before distilling, so the result is the same")
    p.add_argument("--no-autocast", action="store_true",
                   help="train in fp32 (default: bf16 autocast, fp32 master weights)")
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--val-windows", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=50, help="0 skips the evaluation")
    p.add_argument("--eval-k", type=int, default=4)
    p.add_argument("--eval-max-new-tokens", type=int, default=64)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (``tokenizers``); special tokens get ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .data import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    from .data import ASSISTANT_TOKEN, EOS_TOKEN, USER_TOKEN

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------- data


def build_stream(tok, texts, eos_id: int, max_doc_tokens: int, need_tokens: int,
                 desc: str, batch: int = 256):
    """Concatenate tokenized docs (each ending in eos) until ``need_tokens`` tokens."""
    import numpy as np
    from tqdm import tqdm

    chunks: list = []
    total = 0
    pending: list[str] = []
    bar = tqdm(total=need_tokens, desc=desc, unit="tok", unit_scale=True, leave=False)

    def flush():
        nonlocal total
        for enc in tok.encode_batch(pending):
            ids = enc.ids[:max_doc_tokens]
            if not ids:
                continue
            if ids[-1] != eos_id:
                ids = ids + [eos_id]
            chunks.append(np.asarray(ids, dtype=np.int32))
            total += len(ids)
            bar.update(len(ids))
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) >= batch:
            flush()
            if total >= need_tokens:
                break
    if pending and total < need_tokens:
        flush()
    bar.close()
    if not chunks:
        raise RuntimeError("no training text")
    return np.concatenate(chunks), len(chunks)


def make_windows(stream, seq_len: int, seed: int):
    import torch

    n = len(stream) // seq_len
    w = torch.from_numpy(stream[: n * seq_len].astype("int64")).view(n, seq_len)
    g = torch.Generator().manual_seed(seed)
    return w[torch.randperm(n, generator=g)]


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


def draft_arch(args) -> dict:
    return args.draft_arch or DRAFT_ARCH


def make_model(arch: dict, vocab_size: int, eos_id: int, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(arch, vocab_size, eos_id))
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def make_optimizer(model, lr: float, weight_decay: float):
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
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _autocast(enabled: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def lm_loss(model, x, autocast: bool):
    import torch.nn.functional as F

    with _autocast(autocast):
        logits = model(input_ids=x).logits
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


def kd_losses(draft, target, x, autocast: bool, temperature: float):
    """(KL(target||draft) per token, CE of draft) on windows ``x``."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad(), _autocast(autocast):
        t_logits = target(input_ids=x).logits
    with _autocast(autocast):
        d_logits = draft(input_ids=x).logits
    V = d_logits.size(-1)
    t = t_logits[:, :-1].float().reshape(-1, V)
    d = d_logits[:, :-1].float().reshape(-1, V)
    T = temperature
    kl = F.kl_div(F.log_softmax(d / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="batchmean") * (T * T)
    ce = F.cross_entropy(d, x[:, 1:].reshape(-1))
    return kl, ce


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


def train_target(args, windows, vocab_size, eos_id, steps: int):
    import torch
    from tqdm import tqdm

    model = make_model(TARGET_ARCH, vocab_size, eos_id, args.seed)
    model.train()
    opt = make_optimizer(model, args.target_lr, args.weight_decay)
    B = args.batch_size
    hist = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="target", unit="step", mininterval=5)
    ema = None
    for step in bar:
        lr = lr_at(step, steps, args.target_lr, args.warmup_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.arange(step * B, (step + 1) * B) % len(windows)
        loss = lm_loss(model, windows[idx], not args.no_autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        v = loss.item()
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}")
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            hist.append({"step": step + 1, "loss": round(ema, 4)})
    bar.close()
    wall = time.perf_counter() - t0
    return model, {"steps": steps, "wall_s": round(wall, 1), "final_train_loss_ema": round(ema, 4),
                   "history": hist}


def train_draft(args, windows, target, vocab_size, eos_id, steps: int):
    import torch
    from tqdm import tqdm

    model = make_model(draft_arch(args), vocab_size, eos_id, args.seed + 1)
    model.train()
    target.eval()
    opt = make_optimizer(model, args.draft_lr, args.weight_decay)
    B = args.batch_size
    a = args.kd_alpha
    hist = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="draft", unit="step", mininterval=5)
    ema_kl = ema_ce = None
    for step in bar:
        lr = lr_at(step, steps, args.draft_lr, args.warmup_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.arange(step * B, (step + 1) * B) % len(windows)
        kl, ce = kd_losses(model, target, windows[idx], not args.no_autocast, args.kd_temperature)
        loss = a * kl + (1 - a) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        k, c = kl.item(), ce.item()
        ema_kl = k if ema_kl is None else 0.95 * ema_kl + 0.05 * k
        ema_ce = c if ema_ce is None else 0.95 * ema_ce + 0.05 * c
        bar.set_postfix(kl=f"{ema_kl:.3f}", ce=f"{ema_ce:.3f}", lr=f"{lr:.2e}")
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            hist.append({"step": step + 1, "kl": round(ema_kl, 4), "ce": round(ema_ce, 4)})
    bar.close()
    wall = time.perf_counter() - t0
    return model, {"steps": steps, "wall_s": round(wall, 1),
                   "final_train_kl_ema": round(ema_kl, 4), "final_train_ce_ema": round(ema_ce, 4),
                   "history": hist}


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


def kd_losses_masked(draft, target, x, mask, autocast: bool, temperature: float):
    """Like :func:`kd_losses` but averaged over ``mask`` positions (right padding is
    harmless under causal attention)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad(), _autocast(autocast):
        t_logits = target(input_ids=x).logits
    with _autocast(autocast):
        d_logits = draft(input_ids=x).logits
    m = mask.reshape(-1)
    V = d_logits.size(-1)
    t = t_logits[:, :-1].float().reshape(-1, V)[m]
    d = d_logits[:, :-1].float().reshape(-1, V)[m]
    y = x[:, 1:].reshape(-1)[m]
    T = temperature
    kl = F.kl_div(F.log_softmax(d / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="batchmean") * (T * T)
    ce = F.cross_entropy(d, y)
    return kl, ce


def train_draft_on_generations(args, draft, target, gen_prompts, gen_conts, eos_id, steps: int):
    """Phase 2 of the draft: distil on the target's own greedy continuations of training
    prompts (the token distribution speculative decoding actually sees)."""
    import torch
    from tqdm import tqdm

    draft.train()
    target.eval()
    opt = make_optimizer(draft, args.gen_lr, args.weight_decay)
    B = args.batch_size
    n = len(gen_prompts)
    g = torch.Generator().manual_seed(args.seed + 2)
    order: list[int] = []
    a = args.gen_kd_alpha
    hist = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="draft on generations", unit="step", mininterval=5)
    ema_kl = ema_ce = None
    for step in bar:
        lr = lr_at(step, steps, args.gen_lr, args.warmup_frac)
        for grp in opt.param_groups:
            grp["lr"] = lr
        while len(order) < B:
            order += torch.randperm(n, generator=g).tolist()
        idx, order = order[:B], order[B:]
        x, mask = make_gen_batches([gen_prompts[i] for i in idx], [gen_conts[i] for i in idx],
                                   eos_id)
        kl, ce = kd_losses_masked(draft, target, x, mask, not args.no_autocast,
                                  args.kd_temperature)
        loss = a * kl + (1 - a) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        k, c = kl.item(), ce.item()
        ema_kl = k if ema_kl is None else 0.95 * ema_kl + 0.05 * k
        ema_ce = c if ema_ce is None else 0.95 * ema_ce + 0.05 * c
        bar.set_postfix(kl=f"{ema_kl:.3f}", ce=f"{ema_ce:.3f}", lr=f"{lr:.2e}")
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            hist.append({"step": step + 1, "kl": round(ema_kl, 4), "ce": round(ema_ce, 4)})
    bar.close()
    return draft, {"steps": steps, "wall_s": round(time.perf_counter() - t0, 1),
                   "final_train_kl_ema": round(ema_kl, 4) if ema_kl is not None else None,
                   "final_train_ce_ema": round(ema_ce, 4) if ema_ce is not None else None,
                   "history": hist}


def validate(target, draft, val, autocast: bool):
    """Held-out per-token CE of both models, KL(target||draft) and greedy top-1 agreement."""
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


# --------------------------------------------------------------------------- saving


def save_model(model, tokenizer, path: Path, dtype_name: str, eos_id: int):
    import torch
    from transformers import GenerationConfig

    dtype = getattr(torch, dtype_name)
    path.mkdir(parents=True, exist_ok=True)
    m = model.to(dtype)  # save_pretrained records the dtype in config.json
    m.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id,
                                           pad_token_id=eos_id)
    m.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    _portable_tokenizer_config(path)
    model.to(torch.float32)


def _portable_tokenizer_config(path: Path) -> None:
    """Make tokenizer_config.json loadable by transformers 4.x as well as 5.x.

    5.x writes ``"tokenizer_class": "TokenizersBackend"`` (unknown to 4.x) and the extra
    special tokens as a list; ``PreTrainedTokenizerFast`` + ``additional_special_tokens``
    is understood by both.
    """
    from .data import ASSISTANT_TOKEN, USER_TOKEN

    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("extra_special_tokens", None)
    cfg["additional_special_tokens"] = [USER_TOKEN, ASSISTANT_TOKEN]
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _strip_target_from(argv: list[str]) -> list[str]:
    """The equivalent full-pipeline command line (without ``--target-from DIR``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--target-from":
            skip = True
        elif not a.startswith("--target-from="):
            out.append(a)
    return out


def write_readme(out: Path, report: dict) -> None:
    t, d = report["target"], report["draft"]
    ev = report.get("eval") or {}
    acc = ev.get("acceptance") or {}
    timing = ev.get("timing") or {}
    lines = [
        "# Demo draft/target model pair",
        "",
        "Two tiny `LlamaForCausalLM` checkpoints sharing one byte-level BPE tokenizer, made",
        "for exercising the minedraft speculative-decoding server on CPU. They are *not*",
        "useful language models (a few million parameters, minutes of CPU training); the",
        "draft is distilled from the target so that greedy speculative decoding accepts",
        "a realistic fraction of drafted tokens.",
        "",
        "| dir | role | params | layers | hidden | heads / kv heads | ffn | dtype |",
        "|---|---|---|---|---|---|---|---|",
        f"| `{TARGET_DIR}/` | target | {t['params']:,} | {t['arch']['num_hidden_layers']} | "
        f"{t['arch']['hidden_size']} | {t['arch']['num_attention_heads']} / "
        f"{t['arch']['num_key_value_heads']} | {t['arch']['intermediate_size']} | "
        f"{report['save_dtype']} |",
        f"| `{DRAFT_DIR}/` | draft | {d['params']:,} | {d['arch']['num_hidden_layers']} | "
        f"{d['arch']['hidden_size']} | {d['arch']['num_attention_heads']} / "
        f"{d['arch']['num_key_value_heads']} | {d['arch']['intermediate_size']} | "
        f"{report['save_dtype']} |",
        "",
        f"Common: vocab {report['tokenizer']['vocab_size']}, tied embeddings, RoPE theta 10000, "
        "max positions 2048, `<|endoftext|>` (id "
        f"{report['tokenizer']['eos_id']}) is bos/eos/pad.",
        "",
        "## How they were produced",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"* Data: {report['data']['source']} "
        f"({report['data']['train_conversations']} train / "
        f"{report['data']['heldout_conversations']} held-out conversations; held-out = "
        "sha1 of the conversation id, see `minedraft/demo/data.py`). Mostly-ASCII "
        f"conversations rendered as chat text, each truncated to {report['data']['max_doc_tokens']} "
        f"tokens, packed into {report['data']['seq_len']}-token windows "
        f"({report['data']['train_tokens']:,} training tokens).",
        "* Chat format: `<|user|>\\n{prompt}\\n<|assistant|>\\n{answer}<|endoftext|>` "
        "(also the tokenizer's `chat_template`).",
        f"* Tokenizer: byte-level BPE (`tokenizers`), fit on {report['tokenizer']['fit_chars']:,} "
        "characters; lossless round trip.",
        f"* Target: AdamW (betas 0.9/0.95, wd {report['hparams']['weight_decay']}), peak lr "
        f"{report['hparams']['target_lr']}, cosine with warmup, batch "
        f"{report['hparams']['batch_size']}x{report['data']['seq_len']}, {t.get('steps')} steps, "
        f"{t.get('wall_s', float('nan')) / 60:.1f} min; bf16 autocast="
        f"{report['hparams']['autocast']}.",
        f"* Draft phase 1: distilled from the target on the same windows, loss = "
        f"{report['hparams']['kd_alpha']} * KL(target || draft) + "
        f"{1 - report['hparams']['kd_alpha']:.2f} * CE, peak lr "
        f"{report['hparams']['draft_lr']}, {d['steps']} steps, {d['wall_s'] / 60:.1f} min.",
    ]
    g = d.get("phase2")
    if g:
        lines += [
            f"* Draft phase 2: the target greedily continues {g['prompts']} *training* prompts "
            f"(first human turns, <= {report['hparams']['gen_max_prompt_tokens']} tokens, "
            f"up to {report['hparams']['gen_max_new_tokens']} new tokens; "
            f"{g['generated_tokens']:,} tokens, {g['generation_wall_s'] / 60:.1f} min), and the "
            f"draft is distilled on those sequences (loss = {report['hparams']['gen_kd_alpha']} * "
            f"KL + {1 - report['hparams']['gen_kd_alpha']:.2f} * CE on the continuation tokens, "
            f"peak lr {report['hparams']['gen_lr']}, {g['steps']} steps, {g['wall_s'] / 60:.1f} "
            "min). This is what lifts greedy acceptance: the draft learns the distribution "
            "greedy speculative decoding actually sees. It also specialises the draft: its "
            "top-1 agreement with the target on ordinary held-out text drops (see Losses), so "
            "acceptance with sampling (temperature > 0) may be lower than the greedy figure.",
        ]
    if "loaded_from" in t:
        lines += [
            f"* The target was trained by an earlier run of this script with the same seed, data "
            f"and target settings (the target code path is unchanged since); the "
            f"checkpoints here come from `{report.get('command_this_invocation', '')}`, which "
            f"reused that target. Target training took "
            f"{t.get('wall_s', float('nan')) / 60:.1f} min; the full pipeline rounds the "
            "target to the save dtype before distilling, so running the command without "
            "`--target-from` (same thread count) should reproduce both checkpoints.",
        ]
    lines += [
        f"* Threads: {report['threads']}; wall time of this invocation "
        f"{report['total_wall_s'] / 60:.1f} min (training {report['train_wall_s'] / 60:.1f} min, "
        "the rest is the evaluation).",
        "",
        "## Losses",
        "",
        f"* Target train loss (EMA, last step): {t.get('final_train_loss_ema')}",
        f"* Draft train KL / CE (EMA, last step): {d['final_train_kl_ema']} / "
        f"{d['final_train_ce_ema']}",
        *([f"* Draft phase 2 train KL / CE (EMA, last step): {g['final_train_kl_ema']} / "
           f"{g['final_train_ce_ema']}"] if g else []),
        f"* Held-out ({report['val']['tokens']} tokens): target CE {report['val']['target_ce']}, "
        f"draft CE {report['val']['draft_ce']}, KL(target||draft) {report['val']['kl']}, "
        f"top-1 agreement {report['val']['top1_agree']}"
        + (f" (after phase 1 only: draft CE {report['val_after_draft_phase1']['draft_ce']}, "
           f"KL {report['val_after_draft_phase1']['kl']}, top-1 agreement "
           f"{report['val_after_draft_phase1']['top1_agree']})" if g else ""),
        "",
    ]
    if acc:
        lines += [
            "## Greedy speculative-decoding acceptance",
            "",
            f"{acc['num_prompts']} held-out ShareGPT first-turn prompts, target greedy "
            f"continuation of up to {acc['max_new_tokens']} tokens, draft proposes "
            f"k={acc['k']} greedy tokens per step (exact lossless simulation, "
            "`python -m minedraft.demo.evaluate`).",
            "",
            f"* acceptance rate (accepted / drafted): **{acc['acceptance_rate']:.3f}**",
            f"* mean accepted length per step: {acc['mean_accepted']:.2f} "
            f"(tokens per target step incl. bonus: {acc['tokens_per_step']:.2f})",
            "",
        ]
    if timing:
        lines += [
            "## Forward times (single thread, HF transformers forward with sdpa attention, "
            f"{timing.get('dtype', 'float32')}, KV cache of {timing['context']} tokens, median of "
            f"{timing['repeats']} runs, ms)",
            "",
            "Measured on a shared 2-core CPU box while other jobs ran; repeated measurements "
            "differed by up to ~1.7x, so treat these as rough ratios.",
            "",
            f"| batch | draft 1-token step | target verify {timing['verify_tokens']} tokens |",
            "|---|---|---|",
        ]
        for row in timing["rows"]:
            lines.append(f"| {row['batch']} | {row['draft_step_ms']:.2f} | "
                         f"{row['target_verify_ms']:.2f} |")
        lines.append("")
    lines += ["Figures are also in `demo-pair.json`.", ""]
    (out / "README.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    import numpy as np
    import torch

    from . import data

    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # ---- data
    source = data.source_name() if args.source == "auto" else args.source
    convs = data.load_conversations(source=source)
    train_c, held_c = data.split(convs)
    log.info("data: %s, %d conversations (%d train / %d held-out)", source, len(convs),
             len(train_c), len(held_c))
    rng = random.Random(args.seed)
    train_c = list(train_c)
    rng.shuffle(train_c)
    mostly_ascii = source == "sharegpt"
    train_texts = list(data.training_texts(train_c, mostly_ascii=mostly_ascii))
    held_texts = list(data.training_texts(held_c, mostly_ascii=mostly_ascii))
    log.info("rendered %d train / %d held-out docs (mostly-ASCII filter=%s)",
             len(train_texts), len(held_texts), mostly_ascii)

    # ---- tokenizer
    fit, nchars = [], 0
    for t in train_texts:
        fit.append(t)
        nchars += len(t)
        if nchars >= args.tokenizer_chars:
            break
    t0 = time.perf_counter()
    if args.target_from is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.target_from / "tokenizer.json"))
        log.info("tokenizer and target loaded from %s", args.target_from)
    else:
        tok = train_tokenizer(fit, args.vocab_size)
    eos_id = tok.token_to_id(data.EOS_TOKEN)
    hf_tok = wrap_tokenizer(tok)
    sample = train_texts[0][:500]
    assert tok.decode(tok.encode(sample).ids, skip_special_tokens=False) == sample
    log.info("tokenizer: vocab %d, eos id %d, fit on %d chars in %.1fs", tok.get_vocab_size(),
             eos_id, nchars, time.perf_counter() - t0)

    # ---- step counts (optional calibration)
    B, L = args.batch_size, args.seq_len
    V = tok.get_vocab_size()
    autocast = not args.no_autocast
    target_steps, draft_steps = args.target_steps, args.draft_steps
    if args.minutes_target is not None or args.minutes_draft is not None:
        cal_x = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1234))
        cal_t = make_model(TARGET_ARCH, V, eos_id, 999)
        cal_opt = make_optimizer(cal_t, 1e-4, 0.0)

        def t_step():
            lm_loss(cal_t, cal_x, autocast).backward()
            cal_opt.step()
            cal_opt.zero_grad(set_to_none=True)

        if args.minutes_target is not None:
            target_steps = calibrate_steps(t_step, args.minutes_target, "target")
        if args.minutes_draft is not None:
            cal_d = make_model(draft_arch(args), V, eos_id, 998)
            cal_dopt = make_optimizer(cal_d, 1e-4, 0.0)

            def d_step():
                kl, ce = kd_losses(cal_d, cal_t, cal_x, autocast, 1.0)
                (kl + ce).backward()
                cal_dopt.step()
                cal_dopt.zero_grad(set_to_none=True)

            draft_steps = calibrate_steps(d_step, args.minutes_draft, "draft")
        del cal_t, cal_opt
        torch.manual_seed(args.seed)
    log.info("steps: target %d, draft %d (batch %dx%d)", target_steps, draft_steps, B, L)

    # ---- token streams
    need = max(target_steps, draft_steps) * B * L
    stream, ndocs = build_stream(tok, train_texts, eos_id, args.max_doc_tokens, need + L,
                                 "tokenize train")
    windows = make_windows(stream, L, args.seed)
    log.info("train stream: %d tokens from %d docs -> %d windows (%.2f epochs for the target)",
             len(stream), ndocs, len(windows), target_steps * B / max(1, len(windows)))
    vstream, _ = build_stream(tok, held_texts, eos_id, args.max_doc_tokens,
                              args.val_windows * L + L, "tokenize held-out")
    val = make_windows(vstream, L, args.seed)[: args.val_windows]

    # ---- train
    if args.target_from is None:
        target, t_info = train_target(args, windows, V, eos_id, target_steps)
        log.info("target: %d steps in %.1f min, train loss %.3f", target_steps,
                 t_info["wall_s"] / 60, t_info["final_train_loss_ema"])
        # distil from exactly the weights that get saved (so --target-from reproduces this)
        with torch.no_grad():  # parameters only: buffers (rotary inv_freq) are not saved
            for prm in target.parameters():
                prm.copy_(prm.to(getattr(torch, args.save_dtype)).to(torch.float32))
    else:
        from transformers import AutoModelForCausalLM

        target = AutoModelForCausalLM.from_pretrained(args.target_from, dtype=torch.float32)
        t_info = {"loaded_from": str(args.target_from)}
        prev = args.target_from.parent / "demo-pair.json"
        if prev.is_file():
            old = json.loads(prev.read_text()).get("target", {})
            t_info.update({k: v for k, v in old.items()
                           if k in ("steps", "wall_s", "final_train_loss_ema", "history")})
            t_info["note"] = ("trained by an earlier invocation of this script (same seed, "
                              "data and target settings); figures copied from its report")
    draft, d_info = train_draft(args, windows, target, V, eos_id, draft_steps)
    log.info("draft phase 1 (data KD): %d steps in %.1f min, KL %.3f, CE %.3f", draft_steps,
             d_info["wall_s"] / 60, d_info["final_train_kl_ema"], d_info["final_train_ce_ema"])
    val_phase1 = validate(target, draft, val, autocast)
    log.info("held-out after phase 1: %s", val_phase1)

    g_info = None
    if args.gen_steps > 0 and args.gen_prompts > 0:
        t0 = time.perf_counter()
        gp = data.first_turn_prompts(train_c, tokenizer=tok, max_tokens=args.gen_max_prompt_tokens,
                                     limit=args.gen_prompts, max_chars=8 * args.gen_max_prompt_tokens,
                                     mostly_ascii=mostly_ascii)
        gen_prompts = [tok.encode(data.render_chat(p)).ids for p in gp]
        gen_conts = generate_greedy(target, gen_prompts, args.gen_max_new_tokens, eos_id,
                                    args.gen_batch_size)
        gen_wall = time.perf_counter() - t0
        n_gen = sum(len(c) for c in gen_conts)
        log.info("generated %d target greedy tokens for %d train prompts in %.1f min", n_gen,
                 len(gen_prompts), gen_wall / 60)
        draft, g_info = train_draft_on_generations(args, draft, target, gen_prompts, gen_conts,
                                                   eos_id, args.gen_steps)
        g_info.update({"prompts": len(gen_prompts), "generated_tokens": n_gen,
                       "generation_wall_s": round(gen_wall, 1)})
        log.info("draft phase 2 (KD on target generations): %d steps in %.1f min, KL %.3f, CE %.3f",
                 args.gen_steps, g_info["wall_s"] / 60, g_info["final_train_kl_ema"],
                 g_info["final_train_ce_ema"])
    val_info = validate(target, draft, val, autocast)
    log.info("held-out: %s", val_info)

    # ---- save
    save_model(target, hf_tok, out / TARGET_DIR, args.save_dtype, eos_id)
    save_model(draft, hf_tok, out / DRAFT_DIR, args.save_dtype, eos_id)
    log.info("saved %s and %s", out / TARGET_DIR, out / DRAFT_DIR)

    cmd_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    cmd = "python -m minedraft.demo.train " + " ".join(cmd_args)
    cmd_full = "python -m minedraft.demo.train " + " ".join(_strip_target_from(cmd_args))
    if args.minutes_target is not None or args.minutes_draft is not None:
        cmd += f"\n# calibrated to --target-steps {target_steps} --draft-steps {draft_steps}"
    report = {
        "command": cmd_full,
        "command_this_invocation": cmd,
        "seed": args.seed,
        "threads": args.threads or torch.get_num_threads(),
        "save_dtype": args.save_dtype,
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "tokenizers": __import__("tokenizers").__version__},
        "data": {"source": source, "train_conversations": len(train_c),
                 "heldout_conversations": len(held_c), "train_docs_used": ndocs,
                 "train_tokens": int(len(stream)), "seq_len": L,
                 "max_doc_tokens": args.max_doc_tokens},
        "tokenizer": {"vocab_size": V, "eos_id": eos_id, "fit_chars": nchars,
                      "special_tokens": list(data.SPECIAL_TOKENS)},
        "hparams": {"batch_size": B, "target_lr": args.target_lr, "draft_lr": args.draft_lr,
                    "weight_decay": args.weight_decay, "warmup_frac": args.warmup_frac,
                    "kd_alpha": args.kd_alpha, "kd_temperature": args.kd_temperature,
                    "gen_prompts": args.gen_prompts,
                    "gen_max_prompt_tokens": args.gen_max_prompt_tokens,
                    "gen_max_new_tokens": args.gen_max_new_tokens, "gen_steps": args.gen_steps,
                    "gen_lr": args.gen_lr, "gen_kd_alpha": args.gen_kd_alpha,
                    "autocast": autocast},
        "target": {"params": n_params(target), "arch": TARGET_ARCH, **t_info},
        "draft": {"params": n_params(draft), "arch": draft_arch(args), **d_info,
                  "phase2": g_info},
        "val": val_info,
        "val_after_draft_phase1": val_phase1,
    }
    del target, draft

    # ---- evaluate
    report["train_wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.eval_prompts > 0:
        from . import evaluate

        ev = evaluate.evaluate(out, k=args.eval_k, num_prompts=args.eval_prompts,
                               max_new_tokens=args.eval_max_new_tokens,
                               timing=not args.skip_timing, source=source)
        report["eval"] = ev
        evaluate.print_report(ev)
    report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "demo-pair.json").write_text(json.dumps(report, indent=2) + "\n")
    write_readme(out, report)
    log.info("wrote %s and %s (total %.1f min)", out / "demo-pair.json", out / "README.md",
             report["total_wall_s"] / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
