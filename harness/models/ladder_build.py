"""Train, cache and load the size ladder's subjects (specs in :mod:`harness.models.ladder`).

Training is a short loop around TransformerLens's own ``HookedTransformer`` (its
``return_type="loss"``), not ``transformer_lens.train.train``, which does not fit: it calls
``torch.manual_seed`` on the global RNG (the caller's randomness changes), draws the data
order from that same global RNG through a shuffling ``DataLoader`` (order and init cannot be
seeded apart), has no learning-rate decay (warm-up only), reports with ``print`` and nested
bars, and its ``max_steps`` runs one step more than asked (no zero-step build).

- Seeded: the initialisation under ``manual_seed(seed)`` inside ``fork_rng`` (the caller's RNG
  is untouched), the order of each epoch a ``randperm`` under a generator seeded by
  (seed, epoch), no dropout in the model; float32 under the suite's pinned math
  (:mod:`harness.models.determinism`) with deterministic algorithms on. Same seed, same bits.
- float32, not bf16 autocast: the pin caps oneDNN (which runs bf16 matmuls on the CPU) at
  AVX2, the suite's reproducibility floor, where bf16 trains at 158 tokens/s against 1,788 in
  float32 (1 layer, d_model 256, one thread, measured); bf16 is faster (3,235) only with
  AVX-512-BF16 unpinned, and a build must stay fast on every x86-64.
- Cached like the SAEs: key = the LadderSpec (architecture, recipe, seed), the tokenizer's
  sha256, the corpus recipe and token sha256, and the torch / transformer-lens versions.
- Gated: the model card (:func:`model_card`) compares the held-out loss with unigram and
  bigram baselines (:mod:`harness.models.ngram`) on the same held-out tokens; a model that
  does not beat the bigram raises :class:`LadderBuildError` and nothing is cached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from harness.activations.cache import ContentCache, cache_key, progress
from harness.data.corpus import Corpus, tokenizer_hash
from harness.models.bpe import cached_tokenizer
from harness.models.ladder import LADDER, LADDER_PREFIX, LadderSpec
from harness.models.ngram import BaselineLosses, baseline_losses
from harness.models.subjects import SubjectError, SubjectSpec

__all__ = ["LadderBuild", "LadderBuildError", "LadderData", "build_ladder_model", "ladder_data",
           "load_ladder"]

PRODUCER = "ladder-model"
VERSION = "1"
TRAIN_THREADS = 1
"""Intra-op threads while a ladder model trains and is scored (restored afterwards): its
matmuls are small (d_model 128), one thread makes its bits independent of the machine's core
count and of the suite's pinned count, and two builds side by side fill two cores
(``python -m harness.build ladder --jobs 2``)."""
LOSS_POINTS = 64
"""Training-loss curve kept in the cache entry: the mean loss over this many equal spans."""


@contextmanager
def threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block, the previous count after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class LadderBuildError(SubjectError):
    """A ladder subject that failed its build (e.g. it does not beat the bigram baseline)."""


@dataclass(frozen=True)
class LadderData:
    """What a ladder subject trains and is judged on."""

    tokenizer: Any
    corpus: Corpus
    """Training contexts first, then the held-out ones (LadderSpec.corpus_recipe)."""
    baselines: BaselineLosses

    def split(self, spec: LadderSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(train (n, n_ctx), heldout (m, n_ctx)) token ids."""
        return self.corpus.tokens[: spec.train_contexts], self.corpus.tokens[spec.train_contexts :]


@dataclass(frozen=True)
class LadderBuild:
    """A trained ladder model's weights (before TL's processing) and card."""

    state: dict[str, torch.Tensor]
    card: dict[str, Any]
    cache_key: str
    cache_hit: bool


def ladder_data(cache: ContentCache, spec: LadderSpec) -> LadderData:
    """The tokenizer and the corpus (each built once per cache) and the count baselines."""
    from harness.activations.harvest import cached_corpus

    tokenizer = cached_tokenizer(cache, spec.tokenizer)
    corpus = cached_corpus(cache, tokenizer, spec.corpus_recipe())
    train = corpus.tokens[: spec.train_contexts]
    heldout = corpus.tokens[spec.train_contexts :]
    return LadderData(tokenizer, corpus, baseline_losses(train, heldout, spec.tokenizer.vocab_size))


def new_model(spec: LadderSpec, tokenizer: Any, seed: int, **cfg: Any) -> Any:
    """A HookedTransformer initialised by TL under ``manual_seed(seed)``; global RNG untouched."""
    from transformer_lens import HookedTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HookedTransformer(spec.tl_config(**cfg), tokenizer, move_to_device=False)


def lr_factor(spec: LadderSpec, step: int) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then a cosine from 1 down to
    ``final_lr_fraction``: ``f + (1 - f) (1 + cos(pi t)) / 2``, t the share of the decay done."""
    warm = max(1, round(spec.warmup_fraction * spec.steps))
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, spec.steps - warm))
    f = spec.final_lr_fraction
    return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * t))


def train(model: Any, spec: LadderSpec, tokens: torch.Tensor) -> torch.Tensor:
    """Train in place on ``tokens`` (n, n_ctx); returns the loss curve (LOSS_POINTS,) or (0,)."""
    from harness.models.determinism import deterministic

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, s))
    losses = torch.zeros(spec.steps)  # (steps,)
    order = torch.Generator().manual_seed(spec.seed)
    steps = progress(range(spec.steps), desc=f"training {LADDER_PREFIX}{spec.name}")
    perm = torch.empty(0, dtype=torch.long)
    model.train()
    with deterministic():
        for step in steps:
            epoch, j = divmod(step, spec.steps_per_epoch)
            if j == 0:
                order.manual_seed(spec.seed * 1_000_003 + epoch)
                perm = torch.randperm(len(tokens), generator=order)
            batch = tokens[perm[j * spec.batch_size : (j + 1) * spec.batch_size]]  # (B, n_ctx)
            loss = model(batch, return_type="loss")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses[step] = loss.detach()
    model.eval()
    if spec.steps == 0:
        return losses
    spans = torch.tensor_split(losses, min(LOSS_POINTS, spec.steps))
    return torch.stack([s.mean() for s in spans])


@torch.no_grad()
def heldout_loss(model: Any, heldout: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every held-out prediction."""
    total = 0.0
    for chunk in torch.split(heldout, batch):  # (b, n_ctx)
        per_token = model(chunk, return_type="loss", loss_per_token=True)  # (b, n_ctx - 1)
        total += float(per_token.double().sum())
    return total / (heldout.shape[0] * (heldout.shape[1] - 1))


def _n_params(model: Any) -> dict[str, int]:
    embedding = {"embed.W_E", "pos_embed.W_pos", "unembed.W_U", "unembed.b_U"}
    named = dict(model.named_parameters())
    return {"n_params": sum(p.numel() for p in named.values()),
            "n_params_non_embedding": sum(p.numel() for n, p in named.items() if n not in embedding)}


def model_card(spec: LadderSpec, model: Any, data: LadderData, loss: float, *,
               trained: bool, curve: torch.Tensor | None = None, seconds: float = 0.0) -> dict:
    """Parameters, tokens seen, held-out loss vs the baselines (see :mod:`harness.models.ngram`)."""
    train_tokens, heldout = data.split(spec)
    card = {
        "subject": LADDER_PREFIX + spec.name + ("" if trained else ":random"),
        "trained": trained,
        "architecture": {k: getattr(model.cfg, k) for k in (
            "n_layers", "d_model", "d_mlp", "n_heads", "d_head", "n_ctx", "d_vocab", "act_fn",
            "normalization_type", "positional_embedding_type")},
        **_n_params(model),
        "tokens_seen": spec.tokens_seen if trained else 0,
        "unique_train_tokens": int(train_tokens.numel()),
        "epochs": spec.epochs if trained else 0,
        "steps": spec.steps if trained else 0,
        "heldout_tokens": int(heldout.numel()),
        "heldout_loss": loss,
        **data.baselines.to_dict(),
        "beats_unigram": loss < data.baselines.unigram,
        "beats_bigram": loss < data.baselines.bigram,
        "bigram_margin": data.baselines.bigram - loss,
        "recipe": spec.to_dict(),
        "tokenizer_sha256": data.corpus.tokenizer_sha256,
        "corpus": data.corpus.provenance(),
    }
    if trained:
        card["train_seconds"] = round(seconds, 1)
        card["train_tokens_per_second"] = round(spec.tokens_seen / seconds, 1) if seconds else None
        if curve is not None and curve.numel():
            card["train_loss_first_last"] = [float(curve[0]), float(curve[-1])]
    return card


def check_gate(card: dict) -> None:
    """A model that does not beat the bigram baseline is not a trained subject."""
    loss, bigram = card["heldout_loss"], card["bigram_loss"]
    if not math.isfinite(loss) or not loss < bigram:
        raise LadderBuildError(
            f"{card['subject']} is not a trained subject: its held-out loss {loss:.4f} nats does "
            f"not beat the bigram baseline {bigram:.4f} (unigram {card['unigram_loss']:.4f}) on "
            f"the same {card['heldout_predictions']} held-out predictions, after "
            f"{card['tokens_seen']} training tokens; nothing was cached")


def _parts(spec: LadderSpec, data: LadderData) -> dict[str, Any]:
    from importlib.metadata import version

    return {"spec": spec, "tokenizer_sha256": tokenizer_hash(data.tokenizer),
            "corpus_recipe": spec.corpus_recipe(), "corpus_sha256": data.corpus.sha256,
            "torch": torch.__version__, "transformer_lens": version("transformer-lens")}


def build_ladder_model(cache: ContentCache, spec: LadderSpec, data: LadderData | None = None) -> LadderBuild:
    """The trained weights and card of ``spec``, from the cache or trained now (and cached)."""
    from harness.evidence.stages import SUBJECT_TRAINING, stage
    from harness.models.determinism import platform

    data = data if data is not None else ladder_data(cache, spec)
    parts = _parts(spec, data)
    key = cache_key(PRODUCER, VERSION, **parts)
    hit = cache.get(PRODUCER, key) is not None

    def compute() -> tuple[dict, dict]:
        with stage(SUBJECT_TRAINING), threads(TRAIN_THREADS):
            model = new_model(spec, data.tokenizer, spec.seed)
            start = time.perf_counter()
            curve = train(model, spec, data.split(spec)[0])
            seconds = time.perf_counter() - start
            card = model_card(spec, model, data, heldout_loss(model, data.split(spec)[1]),
                              trained=True, curve=curve, seconds=seconds)
        check_gate(card)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {**state, "__train_loss_curve": curve}, {"card": card, "made_on": platform()}

    entry = cache.get_or_compute(PRODUCER, VERSION, parts, compute)
    state = {k: v for k, v in entry.tensors.items() if not k.startswith("__")}
    card = {**entry.meta["card"], "cache_key": key, "made_on": entry.meta["made_on"]}
    return LadderBuild(state=state, card=card, cache_key=key, cache_hit=hit)


def load_ladder(spec: SubjectSpec, cache: ContentCache) -> tuple[Any, str, dict]:
    """(processed model, cache identity, model card) of a ladder subject or its twin."""
    from harness.models.loaders import init_twin, pre_processing_identity

    if spec.name not in LADDER:
        raise SubjectError(f"{spec.name} is not a ladder subject; known: {sorted(LADDER)}")
    lspec = LADDER[spec.name]
    data = ladder_data(cache, lspec)
    cfg = {"device": spec.device, "dtype": spec.torch_dtype}
    if spec.random_init:
        model, identity = init_twin(lspec.tl_config(**cfg), data.tokenizer, spec)
        with threads(TRAIN_THREADS):
            loss = heldout_loss(model, data.split(lspec)[1])
        card = model_card(lspec, model, data, loss, trained=False)
        return model, identity, card
    built = build_ladder_model(cache, lspec, data)
    state = {k: v.to(spec.torch_dtype) if v.is_floating_point() else v for k, v in built.state.items()}
    identity = pre_processing_identity(state, spec, ladder_seed=lspec.seed)
    model = new_model(lspec, data.tokenizer, lspec.seed, **cfg)
    model.load_and_process_state_dict(state, **spec.processing.as_kwargs())
    model.move_model_modules_to_device()
    return model.eval(), identity, built.card
