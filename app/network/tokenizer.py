"""WordPiece tokenization with the `tokenizers` package; padding is the executor's job."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextTokenizer:
    """Turns texts into token id lists, truncated to the model's sequence limit."""

    def __init__(self, path: Path, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        self.max_length = max_length

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())
