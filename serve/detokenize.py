"""Per-sample text streaming with stop strings, run on the engine's output thread.

`TextStream` turns a sample's token ids into text deltas (`IncrementalDetokenizer`) and applies
stop strings the way OpenAI-style servers do: the text is cut just before the first stop string
and the sample finishes; text that could still become the start of a stop string is held back
until the next token settles it, so a client never sees a stop string, nor a piece of one that
later has to be taken back.

Why holding back is enough: what was already sent never ends with a proper prefix of a stop
string, so a stop string can only begin inside the held-back text or the new delta, and one
search over their concatenation finds it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from jaxinfer.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


class TextStream:
    """Text deltas of one sample, with stop strings.

    Args:
        tokenizer: None for a model without tokenizer files (text stays empty).
        prompt_ids: the prompt, as context for the first generated token's text.
        stop_strings: strings that end the sample when they appear in its text.
    """

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: Sequence[int],
                 stop_strings: Sequence[str] = ()) -> None:
        self._detok = None if tokenizer is None else IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = tuple(s for s in stop_strings if s)
        self._held = ""
        self.stopped = False

    def add(self, ids: Sequence[int], *, final: bool = False) -> str:
        """Text that is new and safe to send after `ids`; with `final`, everything left.
        Sets `stopped` (and returns the text before the stop string) when one appears."""
        if self.stopped or self._detok is None:
            return ""
        text = self._held + self._detok.add(ids)
        if final:
            text += self._detok.flush()
        self._held = ""
        if not self._stops:
            return text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        if final:
            return text
        keep = self._partial_stop_len(text)
        if keep:
            self._held = text[-keep:]
            return text[:-keep]
        return text

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
