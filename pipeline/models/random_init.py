"""Deterministic random-weight models of each supported architecture, with local tokenizers.

Used for the tiny in-process models of tests and ``configs/tiny.toml`` and for the
``roberta-random-small`` / ``t5-random-small`` defaults, which stand in for real
checkpoints that cannot be installed offline. Their names say they are random.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# torch, tokenizers and transformers are imported where they are used: resolving a tiny
# model (TINY, _CONVENTIONS) on a cached run must not pay seconds of imports.
if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

SHIPPED_CORPUS = Path(__file__).resolve().parents[2] / "data"
CORPUS_FILES = ("sst2/train.tsv", "trec/train.tsv")


@dataclass(frozen=True)
class Size:
    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int


TINY = Size(vocab=1000, hidden=32, layers=2, heads=4, ffn=64)
SMALL = Size(vocab=8000, hidden=256, layers=4, heads=4, ffn=1024)


def shipped_texts() -> list[str]:
    """The texts tokenizers are trained on: the shipped SST-2 and TREC training splits."""
    texts: list[str] = []
    for rel in CORPUS_FILES:
        lines = (SHIPPED_CORPUS / rel).read_text(encoding="utf-8").splitlines()[1:]
        texts.extend(line.rsplit("\t", 1)[0] for line in lines if line)
    return texts


_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_ROBERTA_NAMES = dict(
    bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", cls_token="<s>", sep_token="</s>", mask_token="<mask>"
)
_CONVENTIONS = {
    # family: (special tokens in id order, template, lowercase, token names for transformers)
    "bert": (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        "[CLS] $A [SEP]",
        True,
        dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"),
    ),
    "roberta": (_ROBERTA_SPECIALS, "<s> $A </s>", False, _ROBERTA_NAMES),
    "mpnet": (_ROBERTA_SPECIALS, "<s> $A </s>", True, _ROBERTA_NAMES),  # RoBERTa's tokens, lower-cased like BERT
    "t5": (["<pad>", "</s>", "<unk>"], "$A </s>", False, dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")),
    "llama": (["<unk>", "<s>", "</s>"], "<s> $A", False, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")),
}


def train_tokenizer(family: str, vocab: int, texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the special-token conventions of ``family``.

    The vocabulary is the most frequent words of ``texts``, ties broken alphabetically, so
    the same texts always give the same tokenizer (the subword trainers of ``tokenizers``
    break ties in hash order, which would change the store key from machine to machine).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if family not in _CONVENTIONS:
        raise ValueError(f"no random-init recipe for family {family!r}")
    specials, template, lowercase, names = _CONVENTIONS[family]
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()] if lowercase else [normalizers.NFKC()])
    pre = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max(0, vocab - len(specials))]
    unk = names["unk_token"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token=unk))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    used = [s for s in specials if s in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, specials.index(s)) for s in used])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **names)


def build_random_model(family: str, tokenizer: PreTrainedTokenizerFast, size: Size, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised base model of ``family``; the same seed gives the same weights."""
    import torch

    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _init(family, tokenizer, size, vocab, pad)


def _init(family, tokenizer, size: Size, vocab: int, pad: int):
    from transformers import (
        BertConfig,
        BertModel,
        LlamaConfig,
        LlamaModel,
        MPNetConfig,
        MPNetModel,
        RobertaConfig,
        RobertaModel,
        T5Config,
        T5EncoderModel,
    )

    # what every family but T5 names the same way
    common = {
        "vocab_size": vocab,
        "hidden_size": size.hidden,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "intermediate_size": size.ffn,
        "pad_token_id": pad,
    }
    ends = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "bert":
        model = BertModel(BertConfig(**common, max_position_embeddings=512))
    elif family == "roberta":
        model = RobertaModel(RobertaConfig(**common, **ends, max_position_embeddings=514, type_vocab_size=1))
    elif family == "mpnet":
        model = MPNetModel(MPNetConfig(**common, **ends, max_position_embeddings=514))
    elif family == "t5":
        cfg = T5Config(
            vocab_size=vocab,
            d_model=size.hidden,
            d_kv=size.hidden // size.heads,
            d_ff=size.ffn,
            num_layers=size.layers,
            num_heads=size.heads,
            feed_forward_proj="relu",
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=pad,
            is_encoder_decoder=False,
            use_cache=False,
        )
        model = T5EncoderModel(cfg)
    elif family == "llama":
        model = LlamaModel(LlamaConfig(**common, **ends, num_key_value_heads=max(1, size.heads // 2), max_position_embeddings=512))
    else:
        raise ValueError(f"no random-init recipe for family {family!r}")
    return model.eval()


def random_model(family: str, size: Size = TINY, seed: int = 0, texts: Iterable[str] | None = None):
    """(model, tokenizer) of ``family`` with random weights; deterministic given seed and texts."""
    tokenizer = train_tokenizer(family, size.vocab, shipped_texts() if texts is None else texts)
    return build_random_model(family, tokenizer, size, seed), tokenizer
