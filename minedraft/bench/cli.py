"""`minedraft bench`: the command line over suite.run_suite and report.write.

    minedraft bench --out bench-out                                  # ar, sd, psd, HF assisted on 32 requests
    minedraft bench --modes sd,psd --sweep k=1,2,4,8 --sweep batch=1,4,16,32
    minedraft bench --draft models/demo-draft --draft models/demo-draft-big   # draft-size sweep

Registered into the main `minedraft` parser by `add_parser(subparsers)`, so the benchmark ships with the package and
its flags show in `minedraft bench -h`.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path


def _numbers(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_sweeps(items: list[str]) -> dict[str, list[int]]:
    """['k=1,2,4', 'batch=1,16'] -> {'k': [1, 2, 4], 'batch': [1, 16]}."""
    from minedraft.bench.suite import SWEEPABLE

    out: dict[str, list[int]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("max-batch-size", "batch").replace("num-speculative-tokens", "k")
        if not sep or name not in SWEEPABLE:
            raise argparse.ArgumentTypeError(f"--sweep {item!r}: expected one of {SWEEPABLE} as NAME=V1,V2,...")
        try:
            vals = _numbers(values)
        except ValueError:
            vals = []
        if name != "rate" and any(v != int(v) for v in vals):
            vals = []
        if not vals or min(vals) < (1 if name != "rate" else 1e-9):
            what = "rates > 0 (requests/s)" if name == "rate" else "integers >= 1"
            raise argparse.ArgumentTypeError(f"--sweep {item!r}: values must be {what}")
        out[name] = vals if name == "rate" else [int(v) for v in vals]
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    b = subparsers.add_parser("bench", help="benchmark ar / sd / psd (and HF assisted) on a ShareGPT workload",
                              description="Starts the services per mode, replays one workload, writes results.json, "
                                          "results.md and PNG plots to --out. See benchmarks/README.md.")
    g = b.add_argument_group("models")
    g.add_argument("--target", default="", help="target checkpoint directory (default: the demo target)")
    g.add_argument("--draft", action="append", default=[], help="draft checkpoint directory; repeat for a "
                   "draft-size sweep (the first one is used for the main modes)")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N, passed to both services and the stage "
                   "timings (only cpu is tested)")
    g = b.add_argument_group("workload")
    g.add_argument("-n", "--num-requests", type=int, default=32)
    g.add_argument("--output-len", default="128", help="tokens per request (EOS ignored), or 'dataset' for the "
                   "length of the dataset's answer capped at --max-output-len")
    g.add_argument("--max-output-len", type=int, default=256)
    g.add_argument("--min-prompt-tokens", type=int, default=None)
    g.add_argument("--max-prompt-tokens", type=int, default=512)
    g.add_argument("--split", choices=["heldout", "train", "all"], default="heldout",
                   help="ShareGPT split the prompts come from (the demo pair trained on 'train')")
    g.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals in requests/s (default: all at "
                   "once, offline)")
    g.add_argument("--concurrency", type=int, default=0, help="max requests in flight from the client (0: no cap)")
    g.add_argument("--seed", type=int, default=0)
    g = b.add_argument_group("system")
    g.add_argument("--modes", default="ar,sd,psd,hf", help="comma list of ar, sd, psd, hf (HF assisted) and sd2b "
                   "(sd with one batch of 2 x --max-batch-size: as many requests in flight as psd)")
    g.add_argument("-k", type=int, default=4, help="draft tokens per step")
    g.add_argument("--max-batch-size", type=int, default=16, help="sequences per in-flight batch (psd keeps two)")
    g.add_argument("--runs", type=int, default=1, help="measured runs per point (after one warm-up round)")
    g.add_argument("--no-warmup", action="store_true")
    g = b.add_argument_group("sweeps")
    g.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help="k=1,2,4,8, batch=1,4,16,32 or rate=1,2,4 (Poisson req/s: latency vs load); each point runs "
                   "--sweep-modes side by side")
    g.add_argument("--sweep-modes", default="sd,psd")
    g.add_argument("--sweep-requests", type=int, default=None, help="requests per sweep point (default: -n; "
                   "always at least 2 x batch)")
    g.add_argument("--sweep-waves", type=int, default=None, help="requests per sweep point = WAVES x (2 x batch), "
                   "psd's in-flight count, so each point has the same share of ramp-up and drain (overrides "
                   "--sweep-requests)")
    g.add_argument("--sweep-output-len", type=int, default=None, help="cap on the output length of sweep points "
                   "(default: the workload's), so a sweep can run more requests in the same time")
    g = b.add_argument_group("baselines and stage timings")
    g.add_argument("--hf-requests", type=int, default=None, help="HF assisted runs on the first N requests only "
                   "(default: all); it serves them one at a time")
    g.add_argument("--hf-threads", type=int, default=1, help="torch threads for HF assisted (default 1, as each "
                   "model service uses)")
    g.add_argument("--stage-context", type=int, default=None, help="context length for the isolated stage "
                   "timings (default: mean prompt + half the mean output)")
    g.add_argument("--stage-repeats", type=int, default=15)
    g = b.add_argument_group("output")
    g.add_argument("--out", default="bench-out", help="directory for results.json, results.md, plots, traces, logs")
    g.add_argument("--notes", default="", help="markdown file appended to results.md as 'Notes'")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--resume", action="store_true", help="reuse the points a previous run with the same --out "
                   "saved under OUT/points/ (each point is saved as it finishes)")
    b.set_defaults(fn=run)
    return b


def _command(args) -> str:
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        return "minedraft " + shlex.join(sys.argv[1:])
    return f"minedraft bench ({vars(args)})"


def config_from_args(args):
    from minedraft.bench.suite import SuiteConfig
    from minedraft.bench.workload import WorkloadSpec
    from minedraft.config import DEMO_DRAFT, DEMO_TARGET

    out_len = None if args.output_len == "dataset" else int(args.output_len)
    spec = WorkloadSpec(num_requests=args.num_requests, output_len=out_len, max_output_len=args.max_output_len,
                        min_prompt_tokens=args.min_prompt_tokens, max_prompt_tokens=args.max_prompt_tokens,
                        rate=args.rate, split=args.split, seed=args.seed)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("ar", "sd", "sd2b", "psd", "hf")]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from ar, sd, sd2b, psd, hf")
    return SuiteConfig(target=args.target or DEMO_TARGET, drafts=args.draft or [DEMO_DRAFT], out=Path(args.out),
                       spec=spec, modes=modes, k=args.k, batch=args.max_batch_size, device=args.device,
                       concurrency=args.concurrency, runs=args.runs, warmup=not args.no_warmup,
                       sweeps=parse_sweeps(args.sweep), sweep_modes=[m for m in args.sweep_modes.split(",") if m],
                       sweep_requests=args.sweep_requests, sweep_output_len=args.sweep_output_len,
                       sweep_waves=args.sweep_waves,
                       hf_requests=args.hf_requests, hf_threads=args.hf_threads,
                       stage_context=args.stage_context, stage_repeats=args.stage_repeats,
                       progress=not args.no_progress, resume=args.resume)


def run(args) -> int:
    import time

    from transformers.utils import logging as hf_logging

    from minedraft.bench import report
    from minedraft.bench.suite import run_suite

    import signal

    # SIGTERM unwinds like Ctrl-C, so the clusters' finally blocks stop the services instead of orphaning them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        cfg = config_from_args(args)
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in [cfg.target, *cfg.drafts]:
        if not (Path(path) / "config.json").is_file():
            print(f"error: {path} is not a checkpoint directory (no config.json)", file=sys.stderr)
            return 2

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t = time.monotonic()
    res = run_suite(cfg, log)
    notes = Path(args.notes).read_text() if args.notes else ""
    files = report.write(res, cfg.out, _command(args), notes)
    print(files["markdown"])
    log(f"done in {time.monotonic() - t:.0f}s; wrote {files['json']}, {files['md']} and {', '.join(files['plots'])}")
    failed = sum(h["failed"] for h in res["main_headline"].values())
    return 1 if failed else 0
