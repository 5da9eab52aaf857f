"""`minedraft` command line: run the system locally (`up`), talk to it (`generate`, `info`), benchmark it (`bench`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def _up(args) -> int:
    from minedraft.launcher import Cluster
    from minedraft.supervisor import GiveUp, RestartPolicy, Supervisor

    router_args = ["--num-speculative-tokens", str(args.k), "--max-speculative-tokens", str(args.max_k),
                   "--draft-confidence", str(args.draft_confidence), "--max-batch-size", str(args.max_batch_size),
                   "--host", args.host]
    if args.trace_file:
        router_args += ["--trace-file", args.trace_file]
    cluster = Cluster(mode=args.mode, router_port=args.port, http_port=args.http_port or None, target=args.target,
                      draft=args.draft,
                      device=args.device, router_args=router_args, log_dir=args.log_dir,
                      drafter_args=["--dtype", args.dtype], verifier_args=["--dtype", args.dtype],
                      drain_timeout_s=args.drain_timeout_s)
    print(f"starting drafter, verifier and router ({args.mode}) ...", flush=True)
    t = time.monotonic()
    try:
        cluster.start(timeout_s=args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"start-up failed: {exc}", file=sys.stderr)
        return 1
    pids = ", ".join(f"{role} {p.pid}" for role, p in sorted(cluster.procs.items()))
    http = f", HTTP (OpenAI API, /metrics) on {args.host}:{cluster.http_port}" if cluster.http_port else ""
    print(f"ready in {time.monotonic() - t:.1f}s: gRPC on {args.host}:{cluster.router_port}{http} (pids: {pids})\n"
          f"  try:  minedraft generate \"Tell me about the sea\" --address 127.0.0.1:{cluster.router_port}\n"
          "A process that exits is restarted; Ctrl-C stops everything.", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill <pid>` stops as gracefully as Ctrl-C
    supervisor = Supervisor(cluster, RestartPolicy(max_restarts=args.max_restarts),
                            log=lambda msg: print(f"supervisor: {msg}", file=sys.stderr, flush=True))
    try:
        supervisor.run()
    except GiveUp:
        return 1
    except KeyboardInterrupt:
        print(f"\nstopping: the router finishes in-flight requests (up to {args.drain_timeout_s:.0f} s); "
              "Ctrl-C again stops at once", flush=True)
        try:
            cluster.stop()
        except KeyboardInterrupt:
            cluster.stop(kill=True)
        return 0
    finally:
        if cluster.procs:
            cluster.stop(kill=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _channel(args):
    """Plaintext by default; TLS verified against --ca when given. The token travels as `authorization` metadata."""
    import grpc

    if args.ca:
        from minedraft.rpc import channel_credentials

        ch = grpc.secure_channel(args.address, channel_credentials(args.ca))
    else:
        ch = grpc.insecure_channel(args.address)
    return ch, ((("authorization", f"Bearer {args.token}"),) if args.token else None)


def _generate(args) -> int:
    import grpc

    from minedraft.v1 import common_pb2, generate_pb2 as gpb, generate_pb2_grpc

    sampling = common_pb2.SamplingOptions(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.seed is not None:
        sampling.seed = args.seed
    req = gpb.GenerateRequest(max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop,
                              ignore_eos=args.ignore_eos)
    if args.raw:
        req.prompt = args.prompt
    else:  # the server applies the target's chat template
        req.messages.messages.add(role="user", content=args.prompt)
    ch, metadata = _channel(args)
    with ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        try:
            if args.no_stream:
                r = stub.Generate(req, timeout=args.timeout, metadata=metadata)
                print(r.text)
                last = r
            else:
                last = None
                for msg in stub.GenerateStream(req, timeout=args.timeout, metadata=metadata):
                    print(msg.text, end="", flush=True)
                    last = msg
                print()
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    s, u = last.speculation, last.usage
    print(f"[{gpb.FinishReason.Name(last.finish_reason)}; {u.prompt_tokens} prompt + {u.completion_tokens} new tokens; "
          f"{s.verify_steps} target steps; acceptance {s.acceptance_rate:.2f} ({s.accepted_tokens}/{s.drafted_tokens}),"
          f" {s.mean_acceptance_length:.2f} tokens per draft]", file=sys.stderr)
    return 0


def _info(args) -> int:
    import grpc
    from google.protobuf.json_format import MessageToJson

    from minedraft.v1 import generate_pb2 as gpb, generate_pb2_grpc

    ch, metadata = _channel(args)
    with ch:
        try:
            info = generate_pb2_grpc.GenerationStub(ch).GetInfo(gpb.GetInfoRequest(), timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(MessageToJson(info, preserving_proto_field_name=True) if args.json else format_info(args.address, info))
    return 0


def format_info(address: str, info) -> str:
    """GetInfo as a person reads it: what is served, then one row per replica."""
    lines = [f"router {address}: {'SERVING' if info.serving else 'NOT SERVING'}; mode {info.mode}, "
             f"k={info.num_speculative_tokens}, batch {info.max_batch_size} per in-flight batch, context "
             f"{info.max_context}",
             f"target {info.target_model}" + (f", draft {info.draft_model}" if info.draft_model else ""), ""]
    head = ("replica", "role", "live", "KV blocks in use", "sequences", "lane: running", "waiting", "drafter",
            "transport")
    rows = [head]
    for r in info.replicas:
        kv = f"{r.kv_blocks_in_use}/{r.kv_blocks_total} ({100 * r.kv_blocks_in_use / max(r.kv_blocks_total, 1):.0f}%)"
        lane = r.role == "verifier"
        rows.append((r.address, r.role, "yes" if r.live else "NO", kv if r.live else "-",
                     str(r.active_sequences) if r.live else "-", str(r.running) if lane else "",
                     str(r.waiting) if lane else "", (r.drafter or "none") if lane else "",
                     r.transport if lane else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"  {r.address}: {r.error}" for r in info.replicas if not r.live and r.error]
    return "\n".join(lines)


def main(argv=None) -> int:
    from minedraft.config import MODES, ROLES

    router = f"127.0.0.1:{ROLES['router'].port}"
    p = argparse.ArgumentParser(prog="minedraft", description="batch-parallel speculative decoding over gRPC")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run drafter, verifier and router as local processes, restarting any that exits "
                        "(Ctrl-C stops)")
    up.add_argument("--mode", choices=list(MODES), default="auto", help="auto: the router chooses target-only, "
                    "sd, psd or draft-ahead and k each step; the others pin one schedule")
    up.add_argument("--port", type=int, default=ROLES["router"].port, help="public gRPC port")
    up.add_argument("--host", default="127.0.0.1", help="address the router listens on")
    up.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API, /health and /metrics "
                    "(0 = off)")
    up.add_argument("--target", default="", help="target checkpoint directory (default: the demo target)")
    up.add_argument("--draft", default="", help="draft checkpoint directory (default: the demo draft)")
    up.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N, for both model services")
    up.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="weight dtype of both model services: auto = float32 on CPU (exact), the checkpoint's half "
                    "type on GPU; bfloat16 is the fast choice on a CPU with avx512_bf16 (README)")
    up.add_argument("-k", type=int, default=4, help="draft tokens per step in a pinned mode")
    up.add_argument("--max-k", type=int, default=8, help="auto: the largest k it may choose")
    up.add_argument("--draft-confidence", type=float, default=0.0, help="tau: stop a draft once the product of its "
                    "tokens' confidences would fall below it (0 = off)")
    up.add_argument("--max-batch-size", type=int, default=16, help="sequences per in-flight batch")
    up.add_argument("--log-dir", default="", help="write each service's log here instead of the terminal")
    up.add_argument("--trace-file", default="", help="JSON-lines step trace (for timeline plots)")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for start-up")
    up.add_argument("--drain-timeout-s", type=float, default=30.0, help="on Ctrl-C / SIGTERM, how long in-flight "
                    "requests may take to finish before they are cancelled")
    up.add_argument("--max-restarts", type=int, default=5, help="restarts of one process within 5 minutes before "
                    "the supervisor gives up and stops everything")
    up.set_defaults(fn=_up)

    gen = sub.add_parser("generate", help="send one prompt and stream the answer")
    gen.add_argument("prompt")
    gen.add_argument("--address", default=router)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--raw", action="store_true", help="send the prompt as raw text (default: as a user message, "
                     "which the server renders with the model's chat template)")
    gen.add_argument("--no-stream", action="store_true", help="unary Generate instead of GenerateStream")
    gen.add_argument("--timeout", type=float, default=300)
    gen.set_defaults(fn=_generate)

    info = sub.add_parser("info", help="what the router serves, and each replica's liveness, KV use and queue")
    info.add_argument("--address", default=router)
    info.add_argument("--json", action="store_true", help="the raw GetInfo answer as JSON")
    for cmd in (gen, info):
        cmd.add_argument("--ca", default="", help="connect with TLS, verifying the router against this PEM CA file")
        cmd.add_argument("--token", default=os.environ.get("MINEDRAFT_TOKEN", ""),
                         help="bearer token for a router started with --auth-token(-file) (default: $MINEDRAFT_TOKEN)")
    info.set_defaults(fn=_info)

    from minedraft.bench.adaptive import add_parser as add_bench_adaptive
    from minedraft.bench.cli import add_parser as add_bench
    add_bench(sub)
    add_bench_adaptive(sub)
    from minedraft.tools.gguf_import import add_parser as add_import_gguf
    add_import_gguf(sub)
    from minedraft.tools.fetch_models import add_parser as add_fetch_real_pair
    add_fetch_real_pair(sub)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
