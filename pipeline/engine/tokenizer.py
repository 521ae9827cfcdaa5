"""The checkpoint's tokenizer (tokenizer.json, byte-level BPE for MPT), via the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")


class Tokenizer:
    def __init__(self, inner: _HFTokenizer, eos_token_id: int | None = None) -> None:
        self.inner = inner
        if eos_token_id is None:
            eos_token_id = next(
                (i for tok in EOS_CANDIDATES if (i := inner.token_to_id(tok)) is not None), None
            )
        self.eos_token_id = eos_token_id

    @classmethod
    def from_dir(cls, directory: Path, eos_token_id: int | None = None) -> Tokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        return cls(_HFTokenizer.from_file(str(path)), eos_token_id)

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        # encode_batch, not encode: `tokenizers` runs a batch with the GIL released, a single encode
        # holds it throughout (~3 us a token: 0.1 s for a 38K-token document), and the serving engine's
        # thread cannot launch anything meanwhile (bench/NOTES.md "tasks path host overhead")
        return self.inner.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids, skip_special_tokens=True)
