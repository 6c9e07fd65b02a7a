"""Count baselines for a trained subject's held-out loss: unigram and bigram.

Both are fit on the tokens the model was trained on and scored on the same held-out
predictions as the model (every next token of every held-out context, BOS -> first token
included, as TransformerLens' ``return_type="loss"`` counts them). A model that does not beat
the bigram has learned no more than counting adjacent pairs of its own training data would.

- unigram, add-one: ``p(b) = (c(b) + 1) / (N + V)``;
- bigram, Witten-Bell interpolation with the unigram:
  ``p(b | a) = (c(a, b) + T(a) p(b)) / (c(a) + T(a))``, where ``c(a)`` counts the pairs that
  start with ``a`` and ``T(a)`` the distinct tokens seen after ``a``; ``p(b | a) = p(b)`` for
  an ``a`` never seen. Parameter-free, a standard smoothing for sparse counts (8,192 tokens
  make 67 M possible pairs, most never seen in a few hundred thousand tokens).

Pairs are counted sparsely (sorted pair codes ``a * V + b``), so memory is O(tokens), not
O(V^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BaselineLosses", "baseline_losses"]


@dataclass(frozen=True)
class BaselineLosses:
    """Mean held-out cross-entropy (nats per token) of the count baselines."""

    unigram: float
    """Add-one unigram."""
    bigram: float
    """Witten-Bell-interpolated bigram."""
    fit_tokens: int
    """Tokens the counts were taken from (the model's training contexts)."""
    heldout_predictions: int
    """Next-token predictions scored (held-out contexts x (context length - 1))."""

    def to_dict(self) -> dict:
        return {
            "unigram_loss": self.unigram,
            "bigram_loss": self.bigram,
            "baseline_fit_tokens": self.fit_tokens,
            "heldout_predictions": self.heldout_predictions,
            "baseline_method": "unigram add-one; bigram Witten-Bell interpolated with the "
            "unigram; both fit on the training contexts",
        }


def _pairs(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(n * (T - 1),) int64 codes a * V + b of every adjacent pair inside each context."""
    return (tokens[:, :-1] * vocab_size + tokens[:, 1:]).reshape(-1)


def baseline_losses(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> BaselineLosses:
    """Fit on ``train`` (n, T) and score ``heldout`` (m, T'); token ids < ``vocab_size``."""
    if train.ndim != 2 or heldout.ndim != 2 or heldout.shape[1] < 2:
        raise ValueError("train and heldout must be (contexts, positions) with >= 2 positions")
    if int(max(train.max(), heldout.max())) >= vocab_size:
        raise ValueError(f"token ids exceed the vocabulary size {vocab_size}")
    train, heldout = train.long(), heldout.long()
    n = train.numel()
    uni = torch.bincount(train.reshape(-1), minlength=vocab_size).double()  # (V,)
    p_uni = (uni + 1) / (n + vocab_size)  # (V,)

    codes, pair_counts = torch.unique(_pairs(train, vocab_size), sorted=True, return_counts=True)
    first = codes // vocab_size  # (P,) the a of each distinct pair
    c_a = torch.bincount(first, weights=pair_counts.double(), minlength=vocab_size)  # (V,)
    t_a = torch.bincount(first, minlength=vocab_size).double()  # (V,) distinct successors

    query = _pairs(heldout, vocab_size)  # (Q,)
    a, b = query // vocab_size, query % vocab_size
    pos = torch.searchsorted(codes, query).clamp(max=len(codes) - 1)
    c_ab = torch.where(codes[pos] == query, pair_counts[pos].double(), 0.0)  # (Q,)
    seen = c_a[a] > 0
    p_bi = torch.where(seen, (c_ab + t_a[a] * p_uni[b]) / (c_a[a] + t_a[a]).clamp(min=1), p_uni[b])
    return BaselineLosses(
        unigram=float(-torch.log(p_uni[heldout[:, 1:].reshape(-1)]).mean()),
        bigram=float(-torch.log(p_bi).mean()),
        fit_tokens=n,
        heldout_predictions=int(query.numel()),
    )
