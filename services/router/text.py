"""Incremental detokenization with stop strings, for streaming.

Decoding token by token breaks multi-byte characters and merges, so we decode the whole output each time and emit
the new suffix, holding back (a) a trailing replacement character, which is usually a character still being spelled
out in bytes, and (b) any tail that could be the start of a stop string, so a stop string is never half-sent.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def feed(self, tokens: list[int]) -> str:
        """Add tokens; return the text that can be emitted now. Sets `stopped` when a stop string appeared."""
        self.tokens.extend(tokens)
        text = self._text()
        cut = len(text)
        for s in self.stop:
            i = text.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0 and i < cut:
                cut, self.stopped = i, True
        if not self.stopped:
            if text.endswith("\ufffd"):
                cut = len(text) - 1
            for s in self.stop:  # hold back a possible stop-string prefix at the end
                for n in range(min(len(s) - 1, cut), 0, -1):
                    if text[:cut].endswith(s[:n]):
                        cut = min(cut, len(text[:cut]) - n)
                        break
        cut = max(cut, self.sent)
        out, self.sent = text[self.sent:cut], cut
        return out

    def flush(self) -> str:
        """At the end: everything not yet sent (unless a stop string cut it off)."""
        if self.stopped:
            return ""
        text = self._text()
        out, self.sent = text[self.sent:], len(text)
        return out
