"""Token ids -> streamable text with stop strings: text that could still begin a stop string is
held back until the next token decides; a completed stop string is never emitted (as OpenAI)."""

from __future__ import annotations

from pd_local.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = stop
        self._pending = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Feed one generated token; returns the text that may be sent now."""
        if self.stopped:
            return ""
        self._pending += self._detok.push(token_id)
        return self._release()

    def finish(self) -> str:
        """The request ended (stop token, length, abort): release whatever is held."""
        if self.stopped:
            return ""
        self._pending += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        cut = -1
        for s in self._stop:
            i = self._pending.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        else:
            hold = 0 if final else self._held_suffix()
            out = self._pending[: len(self._pending) - hold]
            self._pending = self._pending[len(out):]
        self.text += out
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending text that starts some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if s.startswith(self._pending[-n:]):
                    best = n
                    break
        return best
