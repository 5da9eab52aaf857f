"""TextStream: incremental detokenization with stop strings, against the tokenizer's own whole-output decode.

Fed in chunks of any size (a speculative step emits several tokens), the text released equals decoding the token
ids released, always; without a stop string that is the whole output; with one, the output ends with the last
token that ends at or before the stop string's first character, and nothing of the stop string is ever released.
"""

from __future__ import annotations

import random

import pytest

from services.router.text import TextStream

TEXT = ("Hello world, this is a test of the émigré naïve 日本語 streaming examples decoder. Some code: "
        "def f(x):\n    return x * 2  # twice\n") * 4
STOPS = ["examples", "日本", "naïve", "zzz", "st", ". S", "\n    ", "x * 2"]


def run(tokenizer, ids, stop, rng):
    ts, parts, released = TextStream(tokenizer, stop), [], []
    i = 0
    while i < len(ids) and not ts.stopped:
        k = rng.randint(1, 6)
        text, new = ts.feed(ids[i:i + k])
        parts.append(text)
        released += new
        i += k
    text, new = ts.flush()
    return ts, "".join(parts) + text, released + new


@pytest.mark.parametrize("seed", range(40))
def test_released_text_is_the_decoding_of_released_ids(tokenizer, seed):
    rng = random.Random(seed)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stop = [rng.choice(STOPS)] if seed % 4 else []
    ts, text, released = run(tokenizer, ids, stop, rng)
    assert released == ids[:len(released)]
    assert text == tokenizer.decode(released, skip_special_tokens=True)
    if not stop or stop[0] not in full:
        assert not ts.stopped and text == full and released == ids
    else:
        assert ts.stopped and stop[0] not in text and full.startswith(text)
        at = full.find(stop[0])
        assert len(text) <= at  # ends at or before the stop string's first character ...
        # ... and only the token holding that character (and what follows) was dropped
        assert len(tokenizer.decode(ids[:len(released) + 1], skip_special_tokens=True)) > at


def test_multibyte_character_split_over_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("日本語", add_special_tokens=False)
    ts = TextStream(tokenizer, [])
    out = [ts.feed([t]) for t in ids]
    assert all("\ufffd" not in text for text, _ in out)
    assert "".join(t for t, _ in out) + ts.flush()[0] == "日本語"


def test_output_ending_inside_a_character_flushes_like_a_whole_decode(tokenizer):
    ids = tokenizer.encode("ab日", add_special_tokens=False)
    cut = ids[:-1] if len(tokenizer.decode(ids[:-1])) < 3 else ids
    ts = TextStream(tokenizer, [])
    text, new = ts.feed(cut)
    tail, more = ts.flush()
    assert text + tail == tokenizer.decode(cut, skip_special_tokens=True) and new + more == cut
