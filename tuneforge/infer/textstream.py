"""Generated token ids to the text a client sees, piece by piece.

Each new token decodes only a short window of ids (the tokens since the last clean boundary), so
an answer of n tokens costs O(n) decoding, not O(n^2); a window that ends in half a character or
rewrites its own start waits for the next token. Stop strings end the answer and are not part
of it: text that might be the beginning of one is held back until it is known not to be. At the
end the whole answer is decoded once and wins over the pieces wherever it still agrees with what
was already sent (a tokenizer's clean-up may differ between a window and the whole)."""

from __future__ import annotations


class TextAssembler:
    def __init__(self, tokenizer, stops: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops or [] if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""        # the answer so far, cut before a stop string once one is seen
        self.sent = 0         # characters of `text` handed out
        self.stopped = False  # a stop string was found
        self._start = 0       # the window's first token
        self._read = 0        # tokens whose text is in `text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, token: int) -> str:
        """Take one generated token; return the text now safe to send ('' when none is)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        known = self._decode(self.ids[self._start:self._read])
        window = self._decode(self.ids[self._start:])
        if window.endswith("\ufffd") or len(window) <= len(known) or not window.startswith(known):
            return ""  # half a character, nothing new, or a merge that rewrites the tail: wait
        before = len(self.text)
        self.text += window[len(known):]
        self._start, self._read = self._read, len(self.ids)
        self._cut_at_stop(before)
        return self._release()

    def finish(self) -> str:
        """The rest of the answer once generation has ended."""
        if not self.stopped:
            whole = self._decode(self.ids)
            if whole.startswith(self.text[:self.sent]):
                self.text = whole
            self._cut_at_stop(0)
        piece = self.text[self.sent:]
        self.sent = max(self.sent, len(self.text))
        return piece

    def _cut_at_stop(self, searched: int) -> None:
        """Cut `text` before the first stop string; text before `searched` was looked at already."""
        cuts = [self.text.find(s, max(0, searched - len(s) + 1)) for s in self.stops]
        cut = min((c for c in cuts if c >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True

    def _release(self) -> str:
        safe = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        piece = self.text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return piece
