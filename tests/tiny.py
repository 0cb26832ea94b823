"""A tiny random-weight multi-exit model artifact, built without the MiniLM weights.

The tokenizer is a real `tokenizers` WordPiece over a small vocabulary and the network
has the real architecture at toy size (4 layers, hidden 32), so the artifact loads and
serves through exactly the code paths the real model uses, in milliseconds.
"""

from __future__ import annotations

import csv
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from app.network import artifact
from app.network.encoder import EncoderConfig
from app.network.heads import mean_pool
from app.network.multi_exit import MultiExitConfig, MultiExitNetwork, pad_batch

CLASSIFIER_SCALE = 2.0  # logit scale: confidences spread over about 0.55..0.95
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
_WORD_LINES = """
a an the this that these those it its is was are were be been being am i you he she we they
me him her us them my your his our their and or but not no nor so if then than too very
of in on at by for with from to into over under about after before again once here there
when where why how all any both each few more most other some such only own same just
good great best fine nice fun love loved lovely wonderful brilliant excellent superb
amazing charming delightful funny smart moving beautiful perfect enjoyable fresh
bad worst awful terrible boring dull poor weak mess stupid ugly painful tedious bland
hate hated waste lame silly slow rotten
movie film story plot actor actors acting cast script scene scenes director ending
music score camera screen hour minutes character characters audience drama comedy
thriller sequel book show time people world life year years way thing things
make made makes see seen watch watched feel feels felt like liked think thought
know knew give gave take took come came go went say said look looks work works
really quite rather almost never always still even also well much many little
long short new old big small first last whole real true high low full hard easy
run ##s ##ing ##ed ##ly ##er ##est ##ness ##y ##ful
. , ! ? ' -
"""
WORDS = _WORD_LINES.split()


def vocabulary() -> dict[str, int]:
    tokens = list(SPECIAL) + list(dict.fromkeys(WORDS))
    return {t: i for i, t in enumerate(tokens)}


def random_texts(n: int, seed: int = 0, min_words: int = 1, max_words: int = 20) -> list[str]:
    """`n` texts of random vocabulary words, reproducible from `seed`."""
    rng = random.Random(seed)
    words = [w for w in vocabulary() if w not in SPECIAL and not w.startswith("##")]
    return [" ".join(rng.choices(words, k=rng.randint(min_words, max_words))) for _ in range(n)]


def make_tokenizer() -> Tokenizer:
    vocab = vocabulary()
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok


def make_tiny_model(
    path: Path | str,
    *,
    num_layers: int = 4,
    labels: Sequence[str] = ("negative", "positive"),
    thresholds: Sequence[float] | None = None,
    seed: int = 0,
    training: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a loadable artifact (model.json, weights, tokenizer.json) to `path`."""
    path = Path(path)
    tok = make_tokenizer()
    cfg = MultiExitConfig(
        encoder=EncoderConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=32,
            num_layers=num_layers,
            num_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        labels=tuple(labels),
        max_seq_len=32,
    )
    torch.manual_seed(seed)
    net = MultiExitNetwork(cfg).eval()
    _spread_heads(net, tok, seed)
    if thresholds is None:
        thresholds = [round(min(0.7 + 0.1 * i, 0.99), 2) for i in range(num_layers - 1)] + [0.0]
    spec = artifact.ModelSpec(
        name=path.name,
        version="1",
        config=cfg,
        thresholds=[float(t) for t in thresholds],
        base=None,
        training=dict(training or {}),
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        tok.save(str(tok_file))
        artifact.save(path, spec, net, tokenizer_file=tok_file, dtype=dtype)
    return path


def _spread_heads(net: MultiExitNetwork, tok: Tokenizer, seed: int) -> None:
    """Re-initialise every exit head so its confidences spread over 0.5..1.0.

    With default init, mean-pooled states of a random encoder are nearly the same for
    every input and each softmax sits near uniform. Centring and scaling each head's
    input on a set of reference texts, then using large classifier weights, makes
    different inputs get clearly different labels and confidences.
    """
    rows = [e.ids for e in tok.encode_batch(random_texts(256, seed=seed + 1000))]
    ids, mask = pad_batch(rows)
    gen = torch.Generator().manual_seed(seed)
    H, C = net.cfg.encoder.hidden_size, len(net.cfg.labels)
    with torch.no_grad():
        hidden = net(ids, mask, keep_hidden=True).hidden  # L x (N, T, H)
        for head, x in zip(net.heads, hidden, strict=True):
            pooled = mean_pool(x, mask)  # (N, H)
            mu, sd = pooled.mean(0), pooled.std(0).clamp(min=1e-6)  # (H,)
            w = torch.randn(H, H, generator=gen) / H**0.5 / sd[None, :]
            head.dense.weight.copy_(w)
            head.dense.bias.copy_(-w @ mu)
            head.classifier.weight.copy_(
                torch.randn(C, H, generator=gen) * CLASSIFIER_SCALE / H**0.5
            )
            head.classifier.bias.zero_()


def make_tiny_model_with_data(path: Path | str, texts: int = 200, seed: int = 7) -> Path:
    """A tiny model whose training data is a CSV of random texts and labels beside it,
    so `split_data(spec, "test")` finds a test split (what the benchmarks drive)."""
    path = Path(path)
    data = path.with_name(path.name + "-data.csv")
    rng = random.Random(0)
    with data.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(
            (t, rng.choice(["negative", "positive"])) for t in random_texts(texts, seed=seed)
        )
    return make_tiny_model(path, training={"data": {"source": str(data)}, "config": {"seed": 0}})
