"""Incremental detokenization: a sequence's text grows by each new token's
piece, so a long generation costs linear time, not a full decode per token.

Fast tokenizers decode through tokenizers' DecodeStream (as vLLM does), which
keeps the few tokens a multi-byte character or a merged piece needs; other
tokenizers fall back to decoding the whole output. Stop strings are looked
for in the new text only.
"""
from __future__ import annotations

from kvtier.engine.core.sampling_params import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.text = ""
        self._ids: list[int] = []  # the slow path's whole output
        self._stream = None
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream
            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        # Text that may still turn out to start a stop string is not handed out yet.
        self.hold_back = max((len(s) for s in params.stop), default=1) - 1

    def append(self, token_id: int) -> str | None:
        """Add a token's text; returns the stop string it completed, if any
        (the text is then cut at it)."""
        before = len(self.text)
        if self._stream is not None:
            self.text += self._stream.step(self._backend, token_id) or ""
        else:
            self._ids.append(token_id)
            self.text = self.tokenizer.decode(self._ids, skip_special_tokens=self.params.skip_special_tokens)
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                self.text = self.text[:at + len(stop)] if self.params.include_stop_str_in_output else self.text[:at]
                return stop
        return None

    def stable_length(self, finished: bool) -> int:
        """How much of the text can be handed out for good."""
        if finished:
            return len(self.text)
        end = len(self.text) - self.hold_back
        # A trailing U+FFFD is an incomplete UTF-8 sequence the next token completes (slow path).
        while end > 0 and self.text[end - 1] == "\ufffd":
            end -= 1
        return max(0, end)
