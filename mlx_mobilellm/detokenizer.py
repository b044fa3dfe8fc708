"""Streaming detokenization: turn tokens into text deltas as they arrive, never splitting a
UTF-8 character, so that the deltas concatenate to exactly the one-shot decode; and the text of
one generation as it streams, with its stop strings and the reason it finished."""

from __future__ import annotations

from typing import Collection, Optional, Sequence, Tuple

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """Decodes a sliding window that starts a little before the unread tokens: decoding from
    an earlier token keeps context-dependent details (SentencePiece's leading space) the same
    as in the full decode, and the delta is what the unread tokens add to it. A delta ending
    in U+FFFD is an incomplete character (bytes still to come) and waits for more tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add_token(self, token: int) -> str:
        self.tokens.append(token)
        return self._delta(final=False)

    def finalize(self) -> str:
        """Whatever is left, even an incomplete character (as the one-shot decode shows it)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset])
        text = decode(self.tokens[self.prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return text[len(prefix):]


class StopStrings:
    """Holds back text that might be the start of a stop string, so none is ever emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str):
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += text
        # The earliest match: one delta may hold several stop strings.
        found = [at for at in (self.pending.find(stop) for stop in self.stops) if at >= 0]
        if found:
            out, self.pending = self.pending[: min(found)], ""
            return out, True
        hold = max((n for stop in self.stops for n in range(1, len(stop))
                    if self.pending.endswith(stop[:n])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """One generation's text, token by token: each token's text delta and, at the last one,
    why it finished: "stop" (an EOS id, or a stop string: never emitted) or "length" (the
    max_tokens-th token)."""

    def __init__(self, tokenizer, eos_ids: Collection[int], stop: Sequence[str], max_tokens: int):
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.stops = StopStrings(stop)
        self.eos_ids, self.max_tokens, self.count = eos_ids, max_tokens, 0

    def add(self, token: int) -> Tuple[str, Optional[str]]:
        """(the text this token adds, the finish reason or None)."""
        self.count += 1
        is_eos = token in self.eos_ids
        finish = "stop" if is_eos else ("length" if self.count >= self.max_tokens else None)
        text = "" if is_eos else self.detokenizer.add_token(token)
        if finish:
            text += self.detokenizer.finalize()
        text, stopped = self.stops.feed(text)
        if stopped:
            return text, "stop"
        return (text + self.stops.flush(), finish) if finish else (text, None)
