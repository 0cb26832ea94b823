"""Tokenization with the `tokenizers` package; padding is the executor's job.

Texts longer than the model's limit are cut as each request asks (`Truncation`): at the
end (the default), at the start (`left`: the last tokens are kept, the special tokens
around them stay), or not at all: then the text is refused with its length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

SIDES = ("right", "left")


@dataclass(frozen=True)
class Truncation:
    """What to do with a text over the model's token limit."""

    allowed: bool = True  # False: refuse it, naming its length
    side: str = "right"  # which end loses tokens: "right" keeps the start, "left" the end

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"truncation side must be one of {SIDES}, got {self.side!r}")


TRUNCATE = Truncation()


@dataclass(frozen=True)
class TooLong:
    """A text over the limit whose request forbade truncation."""

    length: int  # its tokens, special tokens included
    limit: int


class TextTokenizer:
    """Turns texts into token id lists, truncated to the model's sequence limit."""

    def __init__(self, path: Path, max_length: int) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._left = Tokenizer.from_file(str(path))
        self._left.no_padding()
        self._whole = Tokenizer.from_file(str(path))  # counts a text's tokens, uncut
        self._whole.no_padding()
        self._whole.no_truncation()
        self._tok.enable_truncation(max_length=max_length)
        self._left.enable_truncation(max_length=max_length, direction="left")
        self.max_length = max_length

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]

    def encode_as_asked(
        self, texts: list[str], truncations: list[Truncation]
    ) -> list[list[int] | TooLong]:
        """Each text tokenized as its request asked: cut at the end, at the start, or
        not at all (a `TooLong` in its place when it is over the limit)."""
        if all(t.side == "right" for t in truncations):
            out: list[list[int] | TooLong] = list(self.encode(texts))
        else:
            left = [i for i, t in enumerate(truncations) if t.side == "left"]
            right = [i for i, t in enumerate(truncations) if t.side == "right"]
            out = [[] for _ in texts]
            for tok, idx in ((self._left, left), (self._tok, right)):
                encoded = tok.encode_batch([texts[i] for i in idx], add_special_tokens=True)
                for i, e in zip(idx, encoded, strict=True):
                    out[i] = e.ids
        for i, t in enumerate(truncations):
            ids = out[i]
            if not t.allowed and isinstance(ids, list) and len(ids) >= self.max_length:
                n = len(self._whole.encode(texts[i], add_special_tokens=True).ids)
                if n > self.max_length:
                    out[i] = TooLong(n, self.max_length)
        return out

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())
