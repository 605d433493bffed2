"""Token ids to streamed text: incremental decoding and stop strings.

Both work on text already produced, so the streamed pieces joined equal the whole answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class IncrementalDecoder:
    """Text of each new token, decoded with the tokens before it as context.

    Decoding a token alone can lose its leading space (SentencePiece) or cut a character whose
    bytes span two tokens (byte-level BPE); a piece is released only once it no longer ends in
    U+FFFD, the mark of an unfinished character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens before this are already released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end stays as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def cut_at_stops(pieces: Iterable[str], stops: list[str]) -> Iterator[tuple[str, bool]]:
    """(text to send, a stop string was hit) for each incoming piece; the stop string itself is never sent.

    Text that might begin a stop string is held until the next piece settles it. After a hit the
    caller should stop generating; without one, the held text is released when `pieces` ends.
    """
    text, sent = "", 0
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s, sent) for s in stops) if i >= 0]
        if hits:
            yield text[sent : min(hits)], True
            return
        ready = len(text) - held_back(text[sent:], stops)
        yield text[sent:ready], False
        sent = ready
    yield text[sent:], False
