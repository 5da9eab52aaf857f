"""Incremental detokenization with stop strings, for streaming.

Each token is decoded once: the tokenizer's own incremental decoder (tokenizers' DecodeStream, in Rust) turns token
ids into text as they come, holding back the bytes of a character that is still being spelled out. Re-decoding the
whole output on every step (the obvious way) costs O(output) per step, O(output^2) per request.

Text is released in whole tokens, and a possible start of a stop string is held back until it is known not to be
one, so a stop string is never half-sent. Where a stop string appears, the output ends with the last token that
ends at or before the stop string's first character: a token that straddles that character is dropped with the stop
string. So the text sent is always exactly the decoding of the token ids sent (token ids, usage and text agree), at
the price that the text may end a few characters before the stop string began.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class TextStream:
    """One response's text: fed token ids as the lane accepts them, it releases text with the ids it decodes from."""

    def __init__(self, tokenizer, stop: list[str]):
        self._backend = tokenizer.backend_tokenizer  # a fast (Rust) tokenizer: every Llama-family checkpoint has one
        self._decoder = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self._context = max((len(s) for s in self.stop), default=1) - 1  # text kept before the unsearched part
        self.tokens: list[int] = []
        self._ends: list[int] = []  # per token: characters of text once it is decoded (-1: bytes still pending)
        self._pending = 0  # tokens at the end whose bytes do not form a whole character yet
        self._chars = 0  # characters decoded so far
        self._buf, self._buf_start = "", 0  # the decoded text from character _buf_start on (older text is sent)
        self._searched = 0  # stop strings have been looked for in the text before this character
        self.sent_tokens = 0  # tokens released so far
        self.sent_chars = 0
        self.stopped = False

    def _decode(self, tokens: list[int]) -> None:
        pieces = []
        for t in tokens:
            self.tokens.append(t)
            piece = self._decoder.step(self._backend, t)
            if not piece:
                self._ends.append(-1)
                self._pending += 1
                continue
            pieces.append(piece)
            self._chars += len(piece)
            for i in range(len(self._ends) - self._pending, len(self._ends)):  # they made this character together
                self._ends[i] = self._chars
            self._pending = 0
            self._ends.append(self._chars)
        if pieces:
            self._buf += "".join(pieces)

    def _release(self, upto_char: int) -> tuple[str, list[int]]:
        """Release the tokens whose text ends at or before `upto_char`: (their text, their ids)."""
        n = self.sent_tokens
        while n < len(self._ends) and 0 <= self._ends[n] <= upto_char:
            n += 1
        end = max(self._ends[n - 1] if n else 0, self.sent_chars)
        text = self._buf[self.sent_chars - self._buf_start:end - self._buf_start]
        ids, self.sent_tokens, self.sent_chars = self.tokens[self.sent_tokens:n], n, end
        keep_from = max(self._buf_start, min(self.sent_chars, self._searched - self._context))
        self._buf, self._buf_start = self._buf[keep_from - self._buf_start:], keep_from
        return text, ids

    def feed(self, tokens: list[int]) -> tuple[str, list[int]]:
        """Add tokens; return (the text that can be released now, the token ids it decodes from). Sets `stopped` when
        a stop string appeared: nothing from the token that holds its first character on is ever released."""
        if self.stopped:
            return "", []
        self._decode(tokens)
        cut = self._chars
        if self.stop:
            begin = max(self._buf_start, self._searched - self._context)
            window = self._buf[begin - self._buf_start:]
            for s in self.stop:
                i = window.find(s)
                if i >= 0 and begin + i < cut:
                    cut, self.stopped = begin + i, True
            if not self.stopped:  # hold back a tail that could be the start of a stop string
                for s in self.stop:
                    for n in range(min(len(s) - 1, len(window)), 0, -1):
                        if window.endswith(s[:n]):
                            cut = min(cut, self._chars - n)
                            break
            self._searched = self._chars
        return self._release(cut)

    def flush(self) -> tuple[str, list[int]]:
        """At the end: everything not released yet (unless a stop string cut it off). Bytes still pending (the output
        ended inside a character) decode as the tokenizer decodes them whole, with a replacement character."""
        if self.stopped:
            return "", []
        if self._pending:
            first = len(self.tokens) - self._pending
            tail = self._backend.decode(self.tokens[first:], skip_special_tokens=True)
            self._buf += tail
            self._chars += len(tail)
            for i in range(first, len(self._ends)):
                self._ends[i] = self._chars
            self._pending = 0
        return self._release(self._chars)
