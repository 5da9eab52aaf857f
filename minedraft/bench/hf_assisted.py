"""Baseline outside our system: transformers' assisted generation (`generate(assistant_model=draft,
do_sample=False)`), the speculative decoding most users already have, run one request at a time in this process.

Why one at a time: assisted generation in transformers supports batch size 1 only, so serving N requests means
serving them back to back; its throughput is total output tokens / total generate time. The assistant is set to
propose exactly k tokens per step (constant schedule, no confidence cut-off) so it does the same work per step as
our sd/psd. Output length is forced with min_new_tokens = max_new_tokens (EOS suppressed), as ignore_eos does for the
servers. Per-request latency here is generate time alone (no queueing), so it is not comparable with the servers'
E2E latency under load; only throughput is compared.
"""

from __future__ import annotations

import time

from minedraft.bench.metrics import dist


class _FirstTokenTimer:
    """A transformers streamer that notes when the first generated token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def load(target_dir: str, draft_dir: str, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=torch.float32, local_files_only=True)
    target = AutoModelForCausalLM.from_pretrained(target_dir, **kw).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, **kw).to(device).eval()
    return target, draft


def generate_one(target, draft, prompt_ids: list[int], new_tokens: int, k: int, device: str = "cpu") -> dict:
    import torch

    gc = draft.generation_config
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = k, "constant"
    if hasattr(gc, "assistant_confidence_threshold"):
        gc.assistant_confidence_threshold = 0.0
    ids = torch.tensor([prompt_ids], device=device)
    timer = _FirstTokenTimer()
    eos = target.generation_config.eos_token_id
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=timer,
                              pad_token_id=eos if isinstance(eos, int) else (eos or [0])[0])
        t1 = time.perf_counter()
    n = out.shape[1] - len(prompt_ids)
    return {"tokens": n, "generate_s": t1 - t0, "ttft_s": (timer.first or t1) - t0}


def run(target_dir: str, draft_dir: str, requests, k: int, threads: int = 1, device: str = "cpu",
        progress: bool = True) -> dict:
    """Serve `requests` back to back with assisted generation after one warm-up request; returns throughput and
    per-request generate-time statistics."""
    import torch
    from tqdm import tqdm

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        target, draft = load(target_dir, draft_dir, device)
        generate_one(target, draft, requests[0].prompt_ids, min(16, requests[0].output_len), k, device)  # warm-up
        rows = []
        t0 = time.perf_counter()
        for r in tqdm(requests, desc="hf-assisted", unit="req", leave=False, disable=not progress):
            rows.append(generate_one(target, draft, r.prompt_ids, r.output_len, k, device))
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev)
    tokens = sum(r["tokens"] for r in rows)
    return {"mode": "hf-assisted", "requests": len(rows), "threads": threads, "k": k, "wall_s": wall,
            "output_tokens": tokens, "output_tps": tokens / wall,
            "generate_ms": dist([r["generate_s"] for r in rows]), "ttft_ms": dist([r["ttft_s"] for r in rows]),
            "tpot_ms": dist([(r["generate_s"] - r["ttft_s"]) / max(r["tokens"] - 1, 1) for r in rows])}
