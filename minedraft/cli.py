"""`minedraft` command line: run the system locally (`up`), talk to it (`generate`, `info`), benchmark it (`bench`)."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _up(args) -> int:
    from minedraft.launcher import Cluster

    router_args = ["--num-speculative-tokens", str(args.k), "--max-batch-size", str(args.max_batch_size),
                   "--host", args.host]
    if args.trace_file:
        router_args += ["--trace-file", args.trace_file]
    cluster = Cluster(mode=args.mode, router_port=args.port, target=args.target, draft=args.draft,
                      device=args.device, router_args=router_args, log_dir=args.log_dir)
    print(f"starting drafter, verifier and router ({args.mode}) ...", flush=True)
    t = time.monotonic()
    try:
        cluster.start(timeout_s=args.timeout)
    except (RuntimeError, TimeoutError) as exc:
        print(f"start-up failed: {exc}", file=sys.stderr)
        return 1
    print(f"ready in {time.monotonic() - t:.1f}s: gRPC on {args.host}:{cluster.router_port}\n"
          f"  try:  minedraft generate \"Tell me about the sea\" --address 127.0.0.1:{cluster.router_port}\n"
          "Ctrl-C stops everything.", flush=True)
    try:
        while all(p.poll() is None for p in cluster.procs.values()):
            time.sleep(0.5)
        dead = [r for r, p in cluster.procs.items() if p.poll() is not None]
        print(f"{', '.join(dead)} exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        cluster.stop()


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

    from minedraft.demo.data import render_chat
    from minedraft.v1 import common_pb2, generate_pb2 as gpb, generate_pb2_grpc

    prompt = args.prompt if args.raw else render_chat(args.prompt)
    sampling = common_pb2.SamplingOptions(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.seed is not None:
        sampling.seed = args.seed
    req = gpb.GenerateRequest(prompt=prompt, max_new_tokens=args.max_new_tokens, sampling=sampling, stop=args.stop,
                              ignore_eos=args.ignore_eos)
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
    rate = s.accepted_tokens / s.drafted_tokens if s.drafted_tokens else 0.0
    print(f"[{gpb.FinishReason.Name(last.finish_reason)}; {u.prompt_tokens} prompt + {u.completion_tokens} new tokens; "
          f"{s.verify_steps} target steps; acceptance {rate:.2f} ({s.accepted_tokens}/{s.drafted_tokens})]",
          file=sys.stderr)
    return 0


def _info(args) -> int:
    import grpc

    from minedraft.v1 import generate_pb2 as gpb, generate_pb2_grpc

    ch, metadata = _channel(args)
    with ch:
        try:
            print(generate_pb2_grpc.GenerationStub(ch).GetInfo(gpb.GetInfoRequest(), timeout=10, metadata=metadata))
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv=None) -> int:
    from minedraft.config import ROLES

    router = f"127.0.0.1:{ROLES['router'].port}"
    p = argparse.ArgumentParser(prog="minedraft", description="batch-parallel speculative decoding over gRPC")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run drafter, verifier and router as local processes (Ctrl-C stops)")
    up.add_argument("--mode", choices=["ar", "sd", "psd"], default="psd")
    up.add_argument("--port", type=int, default=ROLES["router"].port, help="public gRPC port")
    up.add_argument("--host", default="127.0.0.1", help="address the router listens on")
    up.add_argument("--target", default="", help="target checkpoint directory (default: the demo target)")
    up.add_argument("--draft", default="", help="draft checkpoint directory (default: the demo draft)")
    up.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N, for both model services")
    up.add_argument("-k", type=int, default=4, help="draft tokens per step")
    up.add_argument("--max-batch-size", type=int, default=16, help="sequences per in-flight batch")
    up.add_argument("--log-dir", default="", help="write each service's log here instead of the terminal")
    up.add_argument("--trace-file", default="", help="JSON-lines step trace (for timeline plots)")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for start-up")
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
    gen.add_argument("--raw", action="store_true", help="send the prompt as is (default: the demo chat format)")
    gen.add_argument("--no-stream", action="store_true", help="unary Generate instead of GenerateStream")
    gen.add_argument("--timeout", type=float, default=300)
    gen.set_defaults(fn=_generate)

    info = sub.add_parser("info", help="what the router serves")
    info.add_argument("--address", default=router)
    for cmd in (gen, info):
        cmd.add_argument("--ca", default="", help="connect with TLS, verifying the router against this PEM CA file")
        cmd.add_argument("--token", default=os.environ.get("MINEDRAFT_TOKEN", ""),
                         help="bearer token for a router started with --auth-token(-file) (default: $MINEDRAFT_TOKEN)")
    info.set_defaults(fn=_info)

    from minedraft.bench.cli import add_parser as add_bench
    add_bench(sub)
    from minedraft.tools.gguf_import import add_parser as add_import_gguf
    add_import_gguf(sub)
    from minedraft.tools.fetch_models import add_parser as add_fetch_real_pair
    add_fetch_real_pair(sub)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
