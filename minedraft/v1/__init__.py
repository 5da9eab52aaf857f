"""Generated gRPC stubs for the minedraft.v1 protocol (sources in `protos/minedraft/v1/`).

Stubs are compiled from the .proto files on first import (and again whenever a .proto changes), with the grpcio-tools
that is installed next to the protobuf runtime, so generated code and runtime never disagree on versions and there is
nothing generated to keep in sync by hand. Compilation goes to a temporary directory and is moved into place, so
several processes starting at once do not trip over each other.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_PROTO_ROOT = _HERE.parent.parent / "protos"
_SOURCES = sorted((_PROTO_ROOT / "minedraft" / "v1").glob("*.proto"))
_STAMP = _HERE / ".stamp"


def _digest() -> str:
    h = hashlib.sha256()
    for p in _SOURCES:
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def compile_protos(out_dir: Path) -> None:
    """Run protoc on every proto into out_dir (which receives minedraft/v1/*_pb2*.py)."""
    from grpc_tools import protoc

    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{_PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}"] + [str(p) for p in _SOURCES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {_PROTO_ROOT}")


def _ensure_stubs() -> None:
    if not _SOURCES:  # installed without the protos directory: stubs must have been generated at build time
        return
    digest = _digest()
    if _STAMP.is_file() and _STAMP.read_text() == digest:
        return
    with tempfile.TemporaryDirectory(dir=_HERE) as tmp:
        compile_protos(Path(tmp))
        for f in (Path(tmp) / "minedraft" / "v1").iterdir():
            os.replace(f, _HERE / f.name)
        stamp_tmp = Path(tmp) / "stamp"
        stamp_tmp.write_text(digest)
        shutil.move(str(stamp_tmp), _STAMP)


_ensure_stubs()
