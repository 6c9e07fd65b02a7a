"""The size ladder: small TransformerLens models in the thesis's families, trained here.

The thesis compares SoLU-1L, SoLU-2L and gpt2-small; offline none of them loads. The ladder
gives the same comparison an offline axis: the two families of Neel Nanda's toy models, SoLU
with its LayerNorm (``act_fn="solu_ln"``, as ``solu-1l``/``solu-2l``) and GELU (as
``gelu-1l``..``gelu-4l``), at 1, 2 and 4 layers, trained on the background corpus with the
ladder's own BPE tokenizer (:mod:`harness.models.bpe`). This module holds only the frozen
specs and the table of names (light to import: :mod:`harness.models.subjects` registers the
names from it); :mod:`harness.models.ladder_build` trains, caches and loads them.

Widths are the same at every depth (d_model 128, d_mlp 512, 4 heads of 32, n_ctx 128, LN,
standard positional embeddings, as in ``solu-1l`` apart from the width), so the ladder varies
depth alone, as the thesis's SoLU-1L/2L comparison does. Width 128 rather than 256: on this
data budget a d_model 256 model reached the same held-out loss at 2.6x the cost (measured).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from harness.data.corpus import SOURCES, CorpusRecipe
from harness.models.bpe import BPESpec

__all__ = ["FAMILIES", "LADDER", "LADDER_PREFIX", "LadderSpec"]

FAMILIES: dict[str, str] = {"solu": "solu_ln", "gelu": "gelu"}
"""Family -> TransformerLens ``act_fn``."""
LADDER_PREFIX = "ladder:"


@dataclass(frozen=True)
class LadderSpec:
    """One ladder subject: architecture, data and training recipe (all of it keys the cache)."""

    family: str
    """``solu`` (act_fn solu_ln: SoLU then a LayerNorm inside the MLP) or ``gelu``."""
    n_layers: int
    """Transformer blocks."""
    d_model: int = 128
    """Residual width."""
    d_mlp: int = 512
    """MLP neurons per layer."""
    d_head: int = 32
    """Width of one attention head; ``n_heads = d_model // d_head``."""
    n_ctx: int = 128
    """Context length trained on; the claims' background corpus uses 128-token contexts."""
    tokenizer: BPESpec = BPESpec()
    """The BPE tokenizer the model reads (its vocabulary is the model's d_vocab)."""
    train_contexts: int = 2000
    """Training contexts of n_ctx tokens (256,000 tokens), drawn from the corpus's documents."""
    heldout_contexts: int = 128
    """Contexts held out (never trained on, nor counted by the baselines): the model card's loss."""
    corpus_sources: tuple[str, ...] = SOURCES
    """Background-corpus sources the training (and held-out) contexts come from."""
    corpus_weights: tuple[float, ...] = (0.06, 0.23, 0.71)
    """Share of contexts from each source: the sources' own shares of the tokens (pydoc topics
    114k, docstrings 407k, source 1,259k with the 8,192 BPE), i.e. every document at the same
    rate. (The claims' corpus mixes 40/30/30, which caps it near 290k tokens: the topics run
    out.)"""
    epochs: int = 3
    """Passes over the training contexts (0: no training; the bigram gate then fails the build).
    Three passes over 256k tokens (768k tokens seen) beat the bigram by ~0.2 nats; one pass over
    as many fresh tokens does not (the bigram, fit on the same tokens, gains more from new
    text than the model from the first pass: measured 5.30 vs 4.85 at 600k fresh tokens)."""
    batch_size: int = 4
    """Contexts per optimiser step."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    warmup_fraction: float = 0.05
    """Share of the steps with a linear warm-up from 0."""
    final_lr_fraction: float = 0.1
    """The cosine decay ends at lr x this."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    seed: int = 0
    """Seed of the initialisation, the data order and the corpus draw."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown ladder family {self.family!r}; known: {sorted(FAMILIES)}")
        if self.n_layers < 1 or self.d_model % self.d_head:
            raise ValueError("need n_layers >= 1 and d_model divisible by d_head")
        if self.epochs < 0 or self.batch_size < 1 or self.train_contexts < self.batch_size:
            raise ValueError("need epochs >= 0 and train_contexts >= batch_size >= 1")
        if self.heldout_contexts < 1 or self.n_ctx < 2:
            raise ValueError("need heldout_contexts >= 1 and n_ctx >= 2")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.final_lr_fraction <= 1:
            raise ValueError("warmup_fraction must lie in [0, 1), final_lr_fraction in [0, 1]")

    @property
    def name(self) -> str:
        """``solu-1l``, ``gelu-4l``, ...; the subject name is LADDER_PREFIX + name."""
        return f"{self.family}-{self.n_layers}l"

    @property
    def act_fn(self) -> str:
        return FAMILIES[self.family]

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (a last partial batch is dropped)."""
        return self.train_contexts // self.batch_size

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def tokens_seen(self) -> int:
        """Tokens the model trained on, counted with repeats (steps x batch x n_ctx)."""
        return self.steps * self.batch_size * self.n_ctx

    def corpus_recipe(self) -> CorpusRecipe:
        """Training contexts first, held-out ones last (the corpus's rows are a seeded shuffle)."""
        return CorpusRecipe(n_contexts=self.train_contexts + self.heldout_contexts,
                            context_len=self.n_ctx, seed=self.seed, sources=self.corpus_sources,
                            weights=self.corpus_weights)

    def tl_config(self, *, device: str = "cpu", dtype: Any = None) -> Any:
        """The HookedTransformerConfig (``seed`` left unset: TL would reseed every global RNG)."""
        import torch
        from transformer_lens import HookedTransformerConfig

        return HookedTransformerConfig(
            n_layers=self.n_layers, d_model=self.d_model, d_mlp=self.d_mlp, d_head=self.d_head,
            n_heads=self.d_model // self.d_head, n_ctx=self.n_ctx,
            d_vocab=self.tokenizer.vocab_size, act_fn=self.act_fn, normalization_type="LN",
            positional_embedding_type="standard", model_name=LADDER_PREFIX + self.name, device=device,
            dtype=dtype if dtype is not None else torch.float32,
        )

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "name": self.name, "act_fn": self.act_fn}


LADDER: dict[str, LadderSpec] = {
    f"{LADDER_PREFIX}{family}-{n}l": LadderSpec(family=family, n_layers=n)
    for family in FAMILIES for n in (1, 2, 4)
}
"""Subject name -> spec: ``ladder:solu-1l`` .. ``ladder:gelu-4l``."""
