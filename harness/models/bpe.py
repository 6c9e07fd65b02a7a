"""The ladder's tokenizer: a byte-level BPE trained on the background corpus's documents.

Trained with the ``tokenizers`` library (the Rust BPE trainer, deterministic: the same text
gives the same merges at any thread count, checked by the tests), in the style of the SoLU
models' ``gpt-neox-tokenizer-digits``: byte-level pre-tokenisation (any text round-trips),
digits split one by one, ``<|endoftext|>`` as id 0 serving as BOS, EOS and UNK. A small
vocabulary keeps the unembedding, which dominates a small model's cost, cheap.

Stored in the content cache as the bytes of ``tokenizer.json`` (key: the spec, a sha256 of
the training text, which depends on the Python installation, and the ``tokenizers`` version),
and materialised next to the cache as a Hugging Face tokenizer directory, so it loads as a
``PreTrainedTokenizerFast`` (TransformerLens reloads a tokenizer from its ``name_or_path``;
Method 2 decodes real tokens through it).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.activations.cache import ContentCache, cache_key
from harness.data.corpus import SOURCES, documents

__all__ = ["EOT", "BPESpec", "cached_tokenizer", "train_bpe", "training_text_sha256"]

EOT = "<|endoftext|>"
PRODUCER = "ladder-tokenizer"
VERSION = "1"
_HF_DIR = "hf"


@dataclass(frozen=True)
class BPESpec:
    """What determines the tokenizer (with the Python installation's documents)."""

    vocab_size: int = 8192
    """Total vocabulary, ``<|endoftext|>`` included."""
    min_frequency: int = 2
    """A merge must occur at least this often in the training text."""
    split_digits: bool = True
    """Digits are pre-tokenised one by one (as in the SoLU models' tokenizer)."""
    sources: tuple[str, ...] = SOURCES
    """Corpus sources whose documents the BPE is trained on (all of them, in this order)."""

    def __post_init__(self) -> None:
        if self.vocab_size < 258:
            raise ValueError("vocab_size must exceed the 256 byte symbols plus <|endoftext|>")
        if not set(self.sources) <= set(SOURCES) or not self.sources:
            raise ValueError(f"sources must be a non-empty subset of {SOURCES}")


def _texts(spec: BPESpec) -> list[str]:
    return [d for s in spec.sources for d in documents(s)]


def training_text_sha256(spec: BPESpec) -> str:
    """sha256 of the training documents, in order, each followed by a NUL."""
    h = hashlib.sha256()
    for text in _texts(spec):
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def train_bpe(spec: BPESpec) -> str:
    """The trained tokenizer as ``tokenizer.json`` text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level])
                         if spec.split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                  special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_texts(spec), trainer=trainer)
    if tok.get_vocab_size() != spec.vocab_size:
        raise ValueError(f"the corpus yields {tok.get_vocab_size()} tokens, not {spec.vocab_size}")
    return tok.to_str()


def _parts(spec: BPESpec) -> dict[str, Any]:
    from importlib.metadata import version

    return {"spec": spec, "text_sha256": training_text_sha256(spec),
            "tokenizers": version("tokenizers")}


def cached_tokenizer(cache: ContentCache, spec: BPESpec) -> Any:
    """The tokenizer (a ``PreTrainedTokenizerFast``), trained once per cache and spec."""
    parts = _parts(spec)

    def compute() -> tuple[dict, dict]:
        data = train_bpe(spec).encode()
        return ({"tokenizer_json": torch.frombuffer(bytearray(data), dtype=torch.uint8)},
                {"vocab_size": spec.vocab_size, "json_sha256": hashlib.sha256(data).hexdigest()})

    entry = cache.get_or_compute(PRODUCER, VERSION, parts, compute)
    data = entry.tensors["tokenizer_json"].numpy().tobytes()
    key = cache_key(PRODUCER, VERSION, **parts)
    return _load_hf(_materialise(cache.root / PRODUCER / _HF_DIR / key[:32], data))


def _materialise(target: Path, data: bytes) -> Path:
    """A Hugging Face tokenizer directory at ``target`` holding ``data`` as its tokenizer.json,
    written to a temporary sibling and renamed into place (a reader sees all or nothing); an
    existing directory whose tokenizer.json differs is replaced."""
    existing = target / "tokenizer.json"
    if existing.is_file() and existing.read_bytes() == data:
        return target
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(data.decode()),
                                       bos_token=EOT, eos_token=EOT, unk_token=EOT)
        fast.save_pretrained(str(tmp))
        (tmp / "tokenizer.json").write_bytes(data)  # the cached bytes, not a re-serialisation
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process placed it first: theirs is checked by the caller
            if not (existing.is_file() and existing.read_bytes() == data):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_hf(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
