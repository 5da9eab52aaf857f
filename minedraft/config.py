"""All configuration, as dataclasses. Each field can be set by a CLI flag (--kv-cache-tokens 4096) or an
environment variable (MINEDRAFT_VERIFIER_KV_CACHE_TOKENS=4096); flags win over the environment, which wins over the
defaults here. The README's configuration table is generated from these docstrings' field comments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_TARGET = str(REPO_ROOT / "models" / "demo-target")
DEMO_DRAFT = str(REPO_ROOT / "models" / "demo-draft")
MODES = ("auto", "ar", "sd", "psd", "ahead")


@dataclass(frozen=True)
class Role:
    """What a process of one role is by default: the one place its port, CPU core and model are set."""

    name: str
    port: int  # default listening port
    cpu_core: int  # default core to pin to (-2 = not pinned)
    model: str  # default checkpoint (the router loads only its tokenizer)


# Drafter and verifier get a core each on a CPU host, so their steps overlap instead of competing.
ROLES = {r.name: r for r in (Role("router", 50051, -2, DEMO_TARGET), Role("drafter", 50061, 0, DEMO_DRAFT),
                             Role("verifier", 50062, 1, DEMO_TARGET))}


@dataclass
class ModelServiceConfig:
    """A drafter or verifier process: one model, one device, one KV cache."""

    model: str = ""  # local HF checkpoint directory (default: the demo draft / target)
    host: str = "127.0.0.1"  # address to listen on
    port: int = 0  # 0 = the role's default port
    device: str = "cpu"  # cpu, cuda or cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, the checkpoint half type on GPU), float32, float16 or bfloat16
    kv_cache_tokens: int = 65536  # KV cache capacity in tokens, across all sequences
    block_size: int = 16  # KV cache block (page) size in tokens
    attention: str = "auto"  # auto (Triton paged kernel on CUDA, SDPA elsewhere), sdpa or triton
    cuda_graphs: bool = True  # on CUDA: replay captured graphs for decode / draft / verify steps
    cpu_core: int = -1  # pin the process and its torch threads to this core; -1 = the role's default, -2 = none
    threads: int = 1  # torch intra-op threads
    max_message_mb: int = 64  # gRPC message size limit
    tls_cert: str = ""  # PEM certificate (chain) file; with --tls-key, serve TLS instead of plaintext
    tls_key: str = ""  # PEM private key file of --tls-cert
    client_ca: str = ""  # PEM CA file; when set, only clients with a certificate it signed may connect (mTLS)

    def resolved(self, role: str) -> "ModelServiceConfig":
        c, defaults = dataclasses.replace(self), ROLES[role]
        c.model = c.model or defaults.model
        c.port = c.port or defaults.port
        if c.cpu_core == -1:
            c.cpu_core = defaults.cpu_core
        return c


@dataclass
class RouterConfig:
    """The public endpoints (gRPC, and the OpenAI-compatible HTTP API) and the PSD scheduler."""

    host: str = "127.0.0.1"  # address to listen on (0.0.0.0 in containers)
    port: int = ROLES["router"].port  # public Generate API
    http_port: int = 0  # OpenAI-compatible HTTP API with /health and /metrics on this port; 0 = off (up: 8000)
    drafters: str = f"127.0.0.1:{ROLES['drafter'].port}"  # drafter address(es), comma separated
    verifiers: str = f"127.0.0.1:{ROLES['verifier'].port}"  # verifier address(es), comma separated
    tokenizer: str = ""  # tokenizer directory (default: the demo target)
    mode: str = "auto"  # auto (chosen each step), or pinned: ar (target only), sd, psd (two batches), ahead (draft-ahead)
    num_speculative_tokens: int = 4  # k: drafts per sequence per step in the pinned modes
    max_speculative_tokens: int = 8  # auto: the largest k it may choose
    draft_confidence: float = 0.0  # tau: stop a draft once the product of its confidences would fall below it (0 = off)
    max_batch_size: int = 16  # sequences per in-flight batch (psd keeps two)
    max_queue: int = 256  # waiting requests beyond which Generate answers RESOURCE_EXHAUSTED
    max_new_tokens_limit: int = 4096  # largest max_new_tokens a request may ask for
    transport: str = "auto"  # auto (negotiate), inline, shm or cuda_ipc: how draft probabilities travel
    trace_file: str = ""  # write a JSON-lines trace of every step (for timeline plots)
    max_message_mb: int = 64  # gRPC message size limit
    rpc_timeout_s: float = 120.0  # a model-service step slower than this is treated as a failure
    drain_timeout_s: float = 30.0  # on SIGTERM: refuse new requests, let in-flight ones finish this long, then cancel
    tls_cert: str = ""  # PEM certificate (chain) file for the public API; with --tls-key, serve TLS
    tls_key: str = ""  # PEM private key file of --tls-cert
    auth_token: str = ""  # bearer token the public API requires when set (prefer the environment variable)
    auth_token_file: str = ""  # file holding the bearer token (read at start-up, whitespace stripped)
    internal_ca: str = ""  # PEM CA file to verify the model services with; set = TLS to drafters and verifiers
    internal_cert: str = ""  # PEM client certificate file presented to the model services (mTLS)
    internal_key: str = ""  # PEM private key file of --internal-cert
    internal_server_name: str = ""  # name the model services' certificates must carry (default: the dialled host)

    def resolved(self) -> "RouterConfig":
        c = dataclasses.replace(self)
        c.tokenizer = c.tokenizer or ROLES["router"].model
        if c.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {c.mode!r}")
        if c.num_speculative_tokens < 1 or c.max_batch_size < 1 or c.max_queue < 0:
            raise ValueError("num_speculative_tokens and max_batch_size must be >= 1, max_queue >= 0")
        if not 0 <= c.http_port < 65536:
            raise ValueError(f"http_port must be 0 (off) or a port number, got {c.http_port}")
        if c.max_speculative_tokens < 1 or not 0.0 <= c.draft_confidence <= 1.0:
            raise ValueError("max_speculative_tokens must be >= 1 and draft_confidence in [0, 1]")
        if c.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        return c


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _field_help(cls) -> dict[str, str]:
    """Pull the trailing '# comment' of each field from the source, so help text lives next to the default."""
    import inspect

    out = {}
    for line in inspect.getsource(cls).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith(("#", '"')):
            out[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
    return out


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        typ = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helps.get(f.name))
        else:
            parser.add_argument(flag, type=typ, default=None, help=helps.get(f.name))


def load(cls, prefix: str, args: argparse.Namespace | None = None, env: typing.Mapping[str, str] | None = None):
    """Defaults, then MINEDRAFT_<PREFIX>_<FIELD> environment variables, then CLI flags."""
    env = os.environ if env is None else env
    values = {}
    for f in dataclasses.fields(cls):
        typ = _field_type(cls, f)
        key = f"MINEDRAFT_{prefix}_{f.name}".upper()
        if key in env:
            raw = env[key]
            values[f.name] = raw.lower() in ("1", "true", "yes", "on") if typ is bool else typ(raw)
        if args is not None and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def config_table(cls, prefix: str) -> str:
    """Markdown table of a config class for the README."""
    helps = _field_help(cls)
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        rows.append(f"| `--{f.name.replace('_', '-')}` | `MINEDRAFT_{prefix}_{f.name.upper()}` | `{f.default!r}` | "
                    f"{helps.get(f.name, '')} |")
    return "\n".join(rows)


__all__ = ["ModelServiceConfig", "RouterConfig", "Role", "ROLES", "add_arguments", "load", "config_table", "MODES",
           "DEMO_TARGET", "DEMO_DRAFT", "REPO_ROOT", "field"]
