"""One generated sequence on the host: its tokens, end-of-text, stop strings, final text."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine.sampling import SamplingParams
from pipeline.engine.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int


class TokenStream:
    """One sequence's generated tokens, with end-of-text and stop-string detection.

    Stop strings are searched in text decoded incrementally (as vLLM detokenizes): each step decodes
    only the tokens since the last emitted piece, plus the piece before it, and keeps the difference,
    so leading-space and byte-merging effects at the window's start cancel out; a piece that ends in
    U+FFFD (a UTF-8 sequence split across byte-level BPE tokens) waits for the next token. Each step
    then searches only the new text and the len(longest stop) - 1 characters before it. Linear in
    max_new_tokens (re-decoding everything each step was quadratic)."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (stop strings only); cut at the first stop string when found
        self.finish_reason = ""
        self._cut_at_stop_string = False
        self._prefix_offset = 0  # tokens[prefix_offset:read_offset] decode to the last emitted piece
        self._read_offset = 0
        self._overlap = max((len(stop) for stop in params.stop), default=1) - 1

    def push(self, token: int) -> None:
        if self.finish_reason:
            return
        if self.params.stop_at_eos and token == self.tokenizer.eos_token_id:
            self.finish_reason = "eos"
            return
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        if self.params.stop:
            self._find_stop(self._new_text())
        if not self.finish_reason and len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"

    def _new_text(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix_offset : self._read_offset])
        now = decode(self.tokens[self._prefix_offset :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # nothing complete yet
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        return now[len(before) :]

    def _find_stop(self, new: str) -> None:
        if not new:
            return
        start = max(0, len(self.text) - self._overlap)  # a stop string may straddle the old text
        self.text += new
        hits = [i for stop in self.params.stop if (i := self.text.find(stop, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
            self._cut_at_stop_string = True

    def completion(self, prompt_tokens: int) -> Completion:
        text = self.text if self._cut_at_stop_string else self.tokenizer.decode(self.tokens)
        return Completion(text=text, tokens=self.tokens, finish_reason=self.finish_reason or "length",
                          prompt_tokens=prompt_tokens)
