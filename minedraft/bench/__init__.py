"""`minedraft bench`: measure ar / sd / psd (and transformers' assisted generation) on one ShareGPT workload.

    workload.py     prompts, output lengths, Poisson arrivals
    client.py       asyncio gRPC load generator, per-request timings
    stages.py       isolated T_draft / T_verify and the ideal PSD bound
    hf_assisted.py  the transformers baseline
    runs.py         one cluster, one mode: warm-up, measured runs, busy fractions, trace
    tracefile.py    the router's step trace: busy intervals, router and gRPC overhead
    metrics.py      pure metric arithmetic
    suite.py        the plan: stages, modes, HF, sweeps
    targets.py      the issue's targets, with the numbers behind each verdict
    report.py       results.json, results.md, plots (plots.py)
    cli.py          the `bench` subcommand
"""
