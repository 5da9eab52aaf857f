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

# This module is the pipeline (command line, the three training phases, saving, the
# report); the pieces live next to it: .tokens (tokenizer, packed windows), .modeling
# (shapes, losses, the one training loop ``fit`` every phase runs) and .readme
# (README.md from the report). The docstring above is the --help text.

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

from .modeling import (
    DRAFT_ARCH,
    DRAFT_DIR,
    TARGET_ARCH,
    TARGET_DIR,
    calibrate_steps,
    fit,
    generate_greedy,
    generation_batches,
    kd_losses,
    lm_loss,
    make_model,
    make_optimizer,
    n_params,
    validate,
    window_batches,
)
from .readme import write_readme
from .tokens import (
    build_stream,
    make_windows,
    portable_tokenizer_config,
    train_tokenizer,
    wrap_tokenizer,
)

log = logging.getLogger("minedraft.demo.train")


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


# --------------------------------------------------------------------------- phases


def draft_arch(args) -> dict:
    return args.draft_arch or DRAFT_ARCH


def train_target(args, windows, vocab_size, eos_id, steps: int):
    """The target: LM loss on the packed windows."""
    model = make_model(TARGET_ARCH, vocab_size, eos_id, args.seed)
    opt = make_optimizer(model, args.target_lr, args.weight_decay)
    autocast = not args.no_autocast
    info = fit(model, opt, steps, window_batches(windows, args.batch_size),
               lambda x: {"loss": lm_loss(model, x, autocast)}, {"loss": 1.0},
               args.target_lr, warmup_frac=args.warmup_frac, log_every=args.log_every,
               desc="target")
    return model, info


def _kd(draft, target, args, x, mask=None) -> dict:
    kl, ce = kd_losses(draft, target, x, not args.no_autocast, args.kd_temperature, mask=mask)
    return {"kl": kl, "ce": ce}


def train_draft(args, windows, target, vocab_size, eos_id, steps: int):
    """Draft phase 1: distil from the target on the same windows."""
    model = make_model(draft_arch(args), vocab_size, eos_id, args.seed + 1)
    target.eval()
    opt = make_optimizer(model, args.draft_lr, args.weight_decay)
    a = args.kd_alpha
    info = fit(model, opt, steps, window_batches(windows, args.batch_size),
               lambda x: _kd(model, target, args, x), {"kl": a, "ce": 1 - a}, args.draft_lr,
               warmup_frac=args.warmup_frac, log_every=args.log_every, desc="draft")
    return model, info


def train_draft_on_generations(args, draft, target, gen_prompts, gen_conts, eos_id, steps: int):
    """Draft phase 2: distil on the target's own greedy continuations of training
    prompts (the token distribution speculative decoding actually sees)."""
    target.eval()
    opt = make_optimizer(draft, args.gen_lr, args.weight_decay)
    a = args.gen_kd_alpha
    batches = generation_batches(gen_prompts, gen_conts, args.batch_size, eos_id, args.seed + 2)
    info = fit(draft, opt, steps, batches, lambda xm: _kd(draft, target, args, *xm),
               {"kl": a, "ce": 1 - a}, args.gen_lr, warmup_frac=args.warmup_frac,
               log_every=args.log_every, desc="draft on generations")
    return draft, info


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
    portable_tokenizer_config(path)
    model.to(torch.float32)


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
    fit_texts, nchars = [], 0
    for t in train_texts:
        fit_texts.append(t)
        nchars += len(t)
        if nchars >= args.tokenizer_chars:
            break
    t0 = time.perf_counter()
    if args.target_from is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.target_from / "tokenizer.json"))
        log.info("tokenizer and target loaded from %s", args.target_from)
    else:
        tok = train_tokenizer(fit_texts, args.vocab_size)
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
