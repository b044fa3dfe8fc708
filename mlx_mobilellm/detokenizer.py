"""Streaming detokenization: turn tokens into text deltas as they arrive, never splitting a
UTF-8 character, so that the deltas concatenate to exactly the one-shot decode."""

from __future__ import annotations

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
