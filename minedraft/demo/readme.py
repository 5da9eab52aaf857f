"""``<out>/README.md`` for the trained demo pair, written from the ``demo-pair.json`` report.

Separate from the training code because it only formats a finished report (the keys
:mod:`minedraft.demo.train` writes, plus :mod:`minedraft.demo.evaluate`'s ``eval`` block);
it can be re-run on an existing ``demo-pair.json`` without torch::

    python -c "import json, pathlib; from minedraft.demo.readme import write_readme; \
p = pathlib.Path('models'); write_readme(p, json.loads((p / 'demo-pair.json').read_text()))"
"""

from __future__ import annotations

from pathlib import Path

from .modeling import DRAFT_DIR, TARGET_DIR


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
