"""Why a verify of k + 1 tokens costs nearly k + 1 decodes on this CPU: the fp32 matmul of a few rows.

A decode multiplies one row by every weight matrix; a verify of k + 1 tokens multiplies k + 1 rows. On a GPU, or with
a BLAS that reads each weight once for all rows, the two cost about the same (both read the weights once), which is
what makes speculative decoding pay. This times one layer shape of the real target (Qwen2.5-Coder-1.5B's MLP up
projection, 1536 -> 8960, 55 MB in fp32) on one thread, for 1 to 16 rows, four ways:

  linear      torch.nn.functional.linear (what the models run: MKL sgemm on this build)
  mkl packed  the same product with the weight reordered once for MKL (torch.ops.mkl._mkl_linear)
  onednn      oneDNN's linear with the weight as an mkldnn tensor
  per row     one matrix-vector product per row (reads the weight once per row: the no-reuse bound)
  w @ x.T     the product taken the other way round (the weight as the left, tall operand)
  bf16 linear linear with bf16 weight and rows (half the bytes; native dot products where the CPU has avx512_bf16)
  bf16 onednn oneDNN's linear in bf16

    python benchmarks/cpu_gemm_small_m.py --out benchmarks/results/real-qwen2.5-coder/gemm_small_m.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,3,4,5,8,16")
    ap.add_argument("--in-features", type=int, default=1536)
    ap.add_argument("--out-features", type=int, default=8960)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(args.out_features, args.in_features)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 8)
    w_dnn = w.to_mkldnn()
    w16 = w.to(torch.bfloat16)
    w16_dnn = w16.to_mkldnn()
    rows_out = []
    for m in [int(x) for x in args.rows.split(",")]:
        x = torch.randn(m, args.in_features)
        row = {"rows": m,
               "linear_ms": median_ms(lambda: F.linear(x, w), args.reps),
               "mkl_packed_ms": median_ms(lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, m), args.reps),
               "onednn_ms": median_ms(lambda: torch._C._nn.mkldnn_linear(x.to_mkldnn(), w_dnn, None).to_dense(),
                                      args.reps),
               "per_row_ms": median_ms(lambda: torch.stack([w @ x[i] for i in range(m)]), args.reps),
               "w_xt_ms": median_ms(lambda: (w @ x.T).T, args.reps)}
        x16 = x.to(torch.bfloat16)
        row["bf16_linear_ms"] = median_ms(lambda: F.linear(x16, w16), args.reps)
        row["bf16_onednn_ms"] = median_ms(
            lambda: torch._C._nn.mkldnn_linear(x16.to_mkldnn(), w16_dnn, None).to_dense(), args.reps)
        rows_out.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        one = rows_out[0]["linear_ms"]
        print(f"{m:3d} rows: " + "  ".join(f"{k[:-3]} {v:6.2f} ms" for k, v in rows_out[-1].items() if k != "rows") +
              f"   linear / linear(1 row) = {rows_out[-1]['linear_ms'] / one:.2f}", flush=True)
    result = {"command": "python benchmarks/cpu_gemm_small_m.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
              "shape": [args.out_features, args.in_features], "threads": args.threads,
              "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "rows": rows_out}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
