"""SAEs for the SAE claim families (S, R): trained locally, loaded from the hub, or diagnostic.

No SAE exists for the offline subject, so :func:`harness.saes.train.get_or_train_saes` trains
them with sae-lens' own trainer (fed from ONE shared corpus pass) as a cached build step keyed by the subject's weight hash, the
corpus hash and the :class:`SAESpec`. The sources' own SAEs (``gpt2-small-res-jb``)
load through ``SAE.from_pretrained`` when the hub or the HF cache has them
(:func:`load_hub_sae`). :func:`identity_sae` and :func:`random_decoder_sae` are known-answer
controls. Every SAE is a real sae-lens ``SAE`` object, so one metric code path serves all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from harness.activations.capture import block_index, content_positions
from harness.activations.layouts import decode_layouts
from harness.models.depth import relative_layers
from harness.models.loaders import weights_hash
from harness.models.subjects import SubjectError, SubjectUnavailable
from harness.statistics.stats import centred_sum_of_squares, fraction_variance_explained

SOURCE_DEPTHS = (6, 8, 10, 11)
"""The source's residual SAE layers (gpt2-small-res-jb, of 12 layers)."""
SOURCE_N_LAYERS = 12
Origin = Literal["trained-locally", "hub", "diagnostic"]


@dataclass(frozen=True)
class SAESpec:
    """Everything that determines a locally trained SAE (with the subject weights and corpus).

    Defaults: a cold build of the five default SAEs on SmolLM2-135M (four residual SAEs of
    2,304 features, k = 32, and one MLP SAE of 3,072, k = 64; 196,608 training tokens = 384
    Adam steps of 512, one shared forward pass up to block 28's input) took 935 s wall on 2 free
    cores (measured 2026-11-22): 789 s of training, of which the SAEs' own forward/backward/
    Adam is ~95 % (profiled; the model forward ~4 %), plus corpus, loading and the quality
    evaluation on the held-out contexts. TopK
    because it needs no L1 sweep (L0 is fixed at k), trains stably in a few hundred Adam
    steps, and its auxiliary loss revives dead latents within the short run; a "standard"
    (ReLU + L1) SAE would need a tuned coefficient and far more steps to reach a comparable
    sparsity/reconstruction trade-off. Its cost: L0 cannot exceed k, so an "inflated L0" on a
    mismatched hook (claim S7) can only show with architecture "standard".
    """

    hook_name: str
    """TransformerLens hook the SAE reads and reconstructs, e.g. ``blocks.15.hook_resid_pre``."""
    d_sae: int
    """Number of features (default: 4 x d_model for residual hooks, 2 x d_mlp for MLP)."""
    architecture: Literal["standard", "topk"] = "topk"
    """sae-lens training architecture: ``topk`` (k active features) or ``standard`` (ReLU+L1)."""
    k: int = 32
    """Active features per token (topk only)."""
    l1_coefficient: float = 5.0
    """L1 sparsity coefficient on decoder-norm-weighted activations (standard only)."""
    training_tokens: int = 196_608
    """Activation vectors trained on (one pass: no corpus token is seen twice)."""
    lr: float = 1e-3
    """Adam learning rate (inputs are scaled to mean norm sqrt(d_in) while training)."""
    lr_decay_fraction: float = 0.2
    """Final share of the steps over which the lr decays linearly to 0."""
    train_batch_size_tokens: int = 512
    """Activation vectors per Adam step."""
    context_size: int = 128
    """Tokens per context fed to the model (at most the corpus context length)."""
    n_batches_for_norm_estimate: int = 8
    """Training batches spent estimating the input scaling factor (not trained on)."""
    dead_feature_window: int = 64
    """Steps without firing after which a feature counts as dead (topk aux loss target)."""
    holdout_contexts: int = 32
    """The corpus's last contexts: never trained on; the quality metrics are measured on them."""
    exclude_bos: bool = True
    """Drop BOS-token activations from training: SmolLM2's attention-sink BOS residual has norm
    ~25,000 against 150-600 elsewhere and would dominate the MSE."""
    seed: int = 0
    """Seeds the SAE initialisation and the order of the activation stream (a full
    permutation of the stored training activations per epoch)."""
    dtype: str = "float32"
    """SAE parameter dtype."""

    def __post_init__(self) -> None:
        if self.architecture not in ("standard", "topk"):
            raise ValueError(f"architecture must be 'standard' or 'topk', not {self.architecture!r}")
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"need 1 <= k <= d_sae; got k={self.k}, d_sae={self.d_sae}")
        if self.training_tokens < self.train_batch_size_tokens or self.holdout_contexts < 1:
            raise ValueError("need training_tokens >= train_batch_size_tokens and holdout_contexts >= 1")
        if not 0 <= self.lr_decay_fraction < 1:
            raise ValueError("lr_decay_fraction must be in [0, 1)")


def sae_depths(n_layers: int) -> tuple[int, ...]:
    """The source's depths mapped onto a model of ``n_layers`` by the suite's one relative-depth
    rule (:func:`harness.models.depth.relative_layers`: round half up, capped at n - 1,
    duplicates dropped). SmolLM2's 30 layers: 15, 20, 25, 28."""
    return relative_layers(SOURCE_DEPTHS, SOURCE_N_LAYERS, n_layers)


MIN_DEPTHS_FOR_A_TREND = 3


def depth_trend_problem(depths: Sequence[int]) -> str | None:
    """Why a trend over ``depths`` (the layers :func:`sae_depths` gave) is not a trend, or None.

    The source's four relative depths collapse onto fewer layers of a shallow subject (a
    2-layer model: layer 1 only; 4 layers: 2 and 3), and a slope or rank correlation over
    fewer than 3 distinct depths says nothing about "deeper"."""
    distinct = sorted(set(depths))
    if len(distinct) >= MIN_DEPTHS_FOR_A_TREND:
        return None
    return (f"the source's relative depths {SOURCE_DEPTHS} of {SOURCE_N_LAYERS} layers map onto "
            f"layers {tuple(distinct)} of this subject: a depth trend needs at least "
            f"{MIN_DEPTHS_FOR_A_TREND} distinct depths")


def default_sae_specs(
    model: Any, *, resid_expansion: int = 4, mlp_expansion: int = 2, mlp_k: int = 64,
    **overrides: Any,
) -> tuple[SAESpec, ...]:
    """Residual SAEs at ``blocks.{L}.hook_resid_pre`` for L in :func:`sae_depths` (family S),
    plus one on ``blocks.{n_layers // 2}.mlp.hook_post`` (family R), all trained in one pass.

    ``mlp.hook_post`` is the MLP's hidden layer (d_mlp wide, SwiGLU output in SmolLM2): the
    activations "Towards Monosemanticity", which family R's source reimplements, decomposed;
    ``hook_mlp_out`` would be the MLP's d_model-wide write into the residual stream instead.
    The residual SAEs are 4 x d_model (2,304 features for SmolLM2): at 8 x d_model the cold
    build of all five took 29.5 min on 2 cores (SAE training, not the model forward, is ~95 %
    of it) and 53-65 % of the 4,608 features never fired on the held-out tokens (FVE
    0.96/0.94/0.89/0.80 at layers 15/20/25/28, CE recovered 0.96-0.97, 2026-11-22).
    The MLP SAE is 2 x d_mlp with k = 64: on SmolLM2 a 4 x d_mlp one reconstructed no better
    (FVE 0.584 vs 0.582 at k = 32, 300 steps) with 40 % of its features dead, and k = 64
    raised the FVE to 0.641 at 2 % density. ``overrides`` replace SAESpec fields in all five.
    """
    cfg = model.cfg
    specs = [SAESpec(hook_name=f"blocks.{L}.hook_resid_pre", d_sae=resid_expansion * cfg.d_model,
                     **overrides) for L in sae_depths(cfg.n_layers)]
    if cfg.d_mlp:
        mlp = {"k": mlp_k, **overrides}
        specs.append(SAESpec(hook_name=f"blocks.{cfg.n_layers // 2}.mlp.hook_post",
                             d_sae=mlp_expansion * cfg.d_mlp, **mlp))
    return tuple(specs)


@dataclass(frozen=True)
class LoadedSAE:
    """An SAE ready for claims. Read-only use only: shared by every test of the session."""

    sae: Any  # sae_lens.SAE (inference class), eval mode
    spec: SAESpec | None
    """The training spec (None for hub and diagnostic SAEs)."""
    quality: dict[str, float]
    """:func:`sae_quality` on the held-out contexts ({} when not measured)."""
    origin: Origin
    source: dict[str, Any]
    """Where from: cache key and training time, hub release/id/repo, or the diagnostic's recipe."""

    @property
    def hook_name(self) -> str:
        return self.sae.cfg.metadata.hook_name

    @functools.cached_property
    def weights_sha256(self) -> str:
        return weights_hash(self.sae)  # ~0.2 s per SAE: once, not once per claim record

    def provenance(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "hook_name": self.hook_name,
            "architecture": self.sae.cfg.architecture(),
            "d_in": self.sae.cfg.d_in,
            "d_sae": self.sae.cfg.d_sae,
            "weights_sha256": self.weights_sha256,
            "spec": None if self.spec is None else dataclasses.asdict(self.spec),
            "quality": self.quality,
            **self.source,
        }


def sae_from_state(cfg_dict: dict[str, Any], state: dict[str, torch.Tensor], device: str = "cpu") -> Any:
    """An inference sae-lens SAE from its config dict and state dict, as ``SAE.load_from_disk``
    builds it (on the meta device first, so no random init runs and no global RNG is used)."""
    from sae_lens import SAE

    cfg_cls = SAE.get_sae_config_class_for_architecture(cfg_dict["architecture"])
    cfg = cfg_cls.from_dict({**cfg_dict, "device": "meta"})
    sae = SAE.get_sae_class_for_architecture(cfg.architecture())(cfg)
    sae.cfg.device = device
    state = dict(state)
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state, assign=True)
    sae.requires_grad_(False)  # read-only, like the subject's parameters
    return sae.to(device=device).eval()



# --- quality ---------------------------------------------------------------------------------


def sae_quality(
    sae: Any, loaded: Any, tokens: torch.Tensor, *, skip_bos: bool = True, batch_size: int = 8
) -> dict[str, float]:
    """Reconstruction, sparsity and downstream metrics of ``sae`` at its hook, on ``tokens``
    (held-out contexts, (n, pos) int64). Sums run in float64 over the kept positions (all but
    position 0 when ``skip_bos``):

    - ``fve`` = 1 - sum||x - x_hat||^2 / sum||x - mean x||^2; ``fve_uncentered`` uses
      sum||x||^2 instead (family R's "1 - ||x - x_hat||^2 / ||x||^2"); ``cosine`` = mean
      cos(x, x_hat);
    - ``l0`` = mean number of nonzero features per token; ``dead_share`` = share of features
      never nonzero on these tokens;
    - ``ce_recovered`` = (CE_zero_ablation - CE_spliced) / (CE_zero_ablation - CE_clean), the
      mean next-token cross-entropy over all positions with x_hat (spliced) or 0 (ablated)
      written at the kept positions of the hook.

    Why not ``sae_lens.evals.get_recons_loss``: it zero-ablates every position but splices only
    the unmasked ones (so BOS handling differs between numerator and baseline), and reruns the
    clean pass per call; here one clean pass yields x, x_hat and the clean CE, and splice and
    ablation touch the same positions. With ``skip_bos=False`` the two agree (tested).
    """
    return sae_quality_many([sae], loaded, tokens, skip_bos=skip_bos, batch_size=batch_size)[0]


def sae_quality_many(
    saes: Sequence[Any], loaded: Any, tokens: torch.Tensor, *, skip_bos: bool = True,
    batch_size: int = 8,
) -> list[dict[str, float]]:
    """:func:`sae_quality` for several SAEs, sharing the clean pass (all hooks captured at once)
    and the zero-ablation pass of each distinct hook: 1 + n_saes + n_hooks forward passes."""
    rows = sae_quality_rows(saes, loaded, tokens, skip_bos=skip_bos, batch_size=batch_size)
    return [quality_from_rows(r) | {"dead_share": r["dead_share"]} for r in rows]


def quality_from_rows(r: dict[str, Any], rows: np.ndarray | None = None) -> dict[str, Any]:
    """The :func:`sae_quality` metrics from per-context sums (:func:`sae_quality_rows`) over
    the chosen contexts (all by default; repeats allowed, so a caller can bootstrap)."""
    idx = np.arange(len(r["n"])) if rows is None else rows
    tot = {k: r[k][idx].sum(0) for k in ("sse", "q", "n", "cos", "l0", "ce_n", "ce_clean",
                                          "ce_spliced", "ce_ablated")}
    n, clean = tot["n"], tot["ce_clean"] / tot["ce_n"]
    spliced, ablated = tot["ce_spliced"] / tot["ce_n"], tot["ce_ablated"] / tot["ce_n"]
    return {
        "fve": fve_from_sums(r, idx),
        "fve_uncentered": float(fraction_variance_explained(tot["sse"], tot["q"])),
        "cosine": float(tot["cos"] / n),
        "l0": float(tot["l0"] / n),
        "ce_clean": float(clean),
        "ce_spliced": float(spliced),
        "ce_zero_ablation": float(ablated),
        "ce_recovered": float((ablated - spliced) / (ablated - clean)),
        "n_tokens": int(n),
        "skip_bos": r["skip_bos"],
    }


@torch.no_grad()
def sae_quality_rows(
    saes: Sequence[Any], loaded: Any, tokens: torch.Tensor, *, skip_bos: bool = True,
    batch_size: int = 8, share_prefix: bool = True,
) -> list[dict[str, Any]]:
    """Per SAE, per-context float64 sums behind :func:`sae_quality` (arrays of length
    n_contexts: ``sse``, ``q``, ``cos``, ``l0``, ``n`` over kept positions, ``s`` (n, d_in),
    ``ce_clean`` / ``ce_spliced`` / ``ce_ablated`` summed over the context's next-token
    losses, ``ce_n``) plus ``dead_share`` over all contexts.

    ``share_prefix``: the spliced and zero-ablated runs of an SAE at block L start from the
    clean run's ``blocks.L.hook_resid_pre`` (TL's ``start_at_layer``) instead of running
    blocks 0..L-1 again: the same function of the same numbers (tests/harness/test_saes.py
    compares both ways), 4.1 instead of 11 full forwards for SmolLM2's five SAEs. Used only
    where TL builds no attention mask or positional input the skipped embedding would have
    produced (right padding, no shortformer embedding); otherwise every run starts at the
    tokens."""
    model, dev = loaded.model, loaded.model.cfg.device
    hooks = [sae.cfg.metadata.hook_name for sae in saes]
    if None in hooks:
        raise ValueError("an SAE's metadata names no hook_name")
    start_of = {h: block_index(h) for h in hooks}
    share_prefix = share_prefix and None not in start_of.values() and _can_start_midway(model)
    starts = sorted({start_of[h] for h in hooks}) if share_prefix else []
    keep = content_positions(tokens.shape[1], skip_bos, dev)  # (pos,)
    keys = ("sse", "q", "s", "cos", "l0", "n", "ce_spliced")
    acc: list[dict[str, list]] = [{k: [] for k in keys} for _ in saes]
    fired = [torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=dev) for sae in saes]
    ce_clean: list[torch.Tensor] = []
    ce_ablated: dict[str, list[torch.Tensor]] = {h: [] for h in dict.fromkeys(hooks)}

    def run(fwd_hooks: list, hook: str | None = None) -> torch.Tensor:
        """(b,) summed next-token loss per context; from ``hook``'s block when sharing."""
        with model.hooks(fwd_hooks=fwd_hooks):
            if hook is None or not share_prefix:
                loss = model(batch, return_type="loss", loss_per_token=True)  # (b, pos - 1)
            else:
                start = start_of[hook]
                loss = model(held[f"blocks.{start}.hook_resid_pre"], start_at_layer=start,
                             tokens=batch, return_type="loss", loss_per_token=True)
        return loss.double().sum(1)

    def replace_kept(values: torch.Tensor):
        def hook_fn(act, hook):
            out = act.clone()
            out[:, keep] = values[:, keep].to(act.dtype)
            return out
        return hook_fn

    with decode_layouts(model):  # bit-identical, without TL's per-call weight copies
        for batch in tokens.split(batch_size):
            batch = batch.to(dev)
            held: dict[str, torch.Tensor] = {}

            def capture(act, hook, held=held):
                held[hook.name] = act
                return act

            wanted = dict.fromkeys([*hooks, *(f"blocks.{L}.hook_resid_pre" for L in starts)])
            ce_clean.append(run([(h, capture) for h in wanted]))
            for h in ce_ablated:
                ce_ablated[h].append(run([(h, replace_kept(torch.zeros_like(held[h])))], h))
            for sae, h, a, fi in zip(saes, hooks, acc, fired, strict=True):
                feats = sae.encode(held[h])  # (b, pos, d_sae)
                x_hat = sae.decode(feats)  # (b, pos, d_in)
                a["ce_spliced"].append(run([(h, replace_kept(x_hat))], h))
                x, xh = held[h][:, keep].double(), x_hat[:, keep].double()  # (b, kept, d_in)
                f = feats[:, keep] != 0  # (b, kept, d_sae)
                a["sse"].append((x - xh).pow(2).sum((1, 2)))
                a["q"].append(x.pow(2).sum((1, 2)))
                a["s"].append(x.sum(1))
                a["cos"].append(torch.nn.functional.cosine_similarity(x, xh, dim=-1).sum(1))
                a["l0"].append(f.sum((1, 2)).double())
                a["n"].append(torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64))
                fi |= f.any(1).any(0)
    clean = torch.cat(ce_clean).cpu().numpy()
    out = []
    for h, a, fi in zip(hooks, acc, fired, strict=True):
        r: dict[str, Any] = {k: torch.cat(v).cpu().numpy() for k, v in a.items()}
        r.update(ce_clean=clean, ce_ablated=torch.cat(ce_ablated[h]).cpu().numpy(),
                 ce_n=np.full(len(clean), float(tokens.shape[1] - 1)),
                 dead_share=1 - fi.double().mean().item(), skip_bos=skip_bos)
        out.append(r)
    return out


QUALITY_ROWS = "sae-quality-rows"
QUALITY_ROWS_VERSION = "1"
_ROW_ARRAYS = ("sse", "q", "s", "cos", "l0", "n", "ce_spliced", "ce_clean", "ce_ablated", "ce_n")


def _quality_rows_parts(loaded: Any, sae: Any, tokens: torch.Tensor, skip_bos: bool) -> dict[str, Any]:
    import hashlib

    from harness.saes.features import _sae_config

    model = loaded.model
    ids = tokens.detach().cpu().numpy().astype(np.int64)
    return {"weights": loaded.weight_hash, "dtype": str(model.cfg.dtype),
            "device": torch.device(model.cfg.device).type, "sae_weights": weights_hash(sae),
            "sae_config": _sae_config(sae), "tokens": hashlib.sha256(ids.tobytes()).hexdigest(),
            "shape": list(ids.shape), "skip_bos": skip_bos}


def _rows_entry(rows: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return ({k: torch.from_numpy(np.ascontiguousarray(rows[k])) for k in _ROW_ARRAYS},
            {"dead_share": float(rows["dead_share"]), "skip_bos": bool(rows["skip_bos"])})


def store_quality_rows(cache: Any, loaded: Any, sae: Any, tokens: torch.Tensor,
                       rows: dict[str, Any]) -> None:
    """Put ``rows`` (one SAE's :func:`sae_quality_rows` on ``tokens``) where
    :func:`cached_quality_rows` reads them: the SAE build measures every SAE's quality on the
    held-out contexts anyway, and family R's R2 bootstraps over exactly those rows."""
    parts = _quality_rows_parts(loaded, sae, tokens, bool(rows["skip_bos"]))
    tensors, meta = _rows_entry(rows)
    cache.put(QUALITY_ROWS, _rows_key(parts), tensors, meta, version=QUALITY_ROWS_VERSION, parts=parts)


def _rows_key(parts: dict[str, Any]) -> str:
    from harness.activations.cache import cache_key

    return cache_key(QUALITY_ROWS, QUALITY_ROWS_VERSION, **parts)


def cached_quality_rows(cache: Any, loaded: Any, sae: Any, tokens: torch.Tensor, *,
                        skip_bos: bool = True) -> dict[str, Any]:
    """:func:`sae_quality_rows` of one SAE through the content cache (``cache=None``: computed).

    Key: the subject's weight identity, dtype and device type, the SAE's weights hash and
    config, the exact token ids and ``skip_bos``. The SAE build writes these rows from its joint
    quality pass over all the subject's SAEs; a miss computes them for this SAE alone, which is
    the same function up to float rounding in the last bits (tests/harness/saes/test_saes.py
    compares the joint and single computations)."""
    if cache is None:
        return sae_quality_rows([sae], loaded, tokens, skip_bos=skip_bos)[0]

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return _rows_entry(sae_quality_rows([sae], loaded, tokens, skip_bos=skip_bos)[0])

    entry = cache.get_or_compute(QUALITY_ROWS, QUALITY_ROWS_VERSION,
                                 _quality_rows_parts(loaded, sae, tokens, skip_bos), compute)
    return {**{k: entry.tensors[k].numpy() for k in _ROW_ARRAYS},
            "dead_share": entry.meta["dead_share"], "skip_bos": entry.meta["skip_bos"]}


def _can_start_midway(model: Any) -> bool:
    """Whether a forward from ``start_at_layer`` computes what the full forward computes from
    there: TL builds an attention mask only under left padding (or a KV cache) and feeds a
    positional input to every block only for shortformer embeddings, and neither is rebuilt
    when the embedding is skipped."""
    tok = getattr(model, "tokenizer", None)
    return (getattr(tok, "padding_side", "right") != "left"
            and model.cfg.positional_embedding_type != "shortformer")


@torch.no_grad()
def reconstruction_sums(sae: Any, acts: torch.Tensor, keep: torch.Tensor,
                        batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per-row sums behind FVE, L0 and the hook-mismatch detector, over the kept positions.

    ``acts`` (n, pos, d_in) activations fed to ``sae``; ``keep`` (n, pos) bool. Per row: ``sse``
    = sum ||x - x_hat||^2, ``q`` = sum ||x||^2, ``s`` = sum x (n, d_in), ``n`` = kept
    positions, ``l0`` = nonzero codes, ``relu_l0`` = positive encoder pre-activations (read at
    sae-lens' ``hook_sae_acts_pre``: what a ReLU SAE with these weights would fire; a TopK
    SAE's own L0 is pinned at k, so only this one can inflate on a wrong hook), and
    ``dense_nonzero`` = nonzero input coordinates. Rows let a caller bootstrap over texts
    (:func:`fve_from_sums`)."""
    keys = ("sse", "q", "n", "l0", "relu_l0", "dense_nonzero")
    out: dict[str, list] = {k: [] for k in (*keys, "s")}
    for xb, kb in zip(acts.split(batch_size), keep.split(batch_size), strict=True):
        kb = kb.to(xb.device)
        x = xb.to(sae.W_enc.dtype)
        _, cache = sae.run_with_cache(x, names_filter=["hook_sae_acts_pre", "hook_sae_acts_post"])
        pre, codes = cache["hook_sae_acts_pre"], cache["hook_sae_acts_post"]  # (b, pos, d_sae)
        x_hat = sae.decode(codes)  # (b, pos, d_in)
        w = kb.double()  # (b, pos)
        xd = x.double()
        out["sse"].append(((xd - x_hat.double()).pow(2).sum(-1) * w).sum(1))
        out["q"].append((xd.pow(2).sum(-1) * w).sum(1))
        out["s"].append((xd * w[..., None]).sum(1))
        out["n"].append(w.sum(1))
        out["l0"].append(((codes != 0).sum(-1) * kb).sum(1).double())
        out["relu_l0"].append(((pre > 0).sum(-1) * kb).sum(1).double())
        out["dense_nonzero"].append(((x != 0).sum(-1) * kb).sum(1).double())
    return {k: torch.cat(v).cpu().numpy() for k, v in out.items()}


def fve_from_sums(sums: dict[str, np.ndarray], rows: np.ndarray | None = None) -> float:
    """FVE = 1 - sum sse / sum ||x - mean x||^2 over the chosen rows (all by default; repeats
    allowed) of per-row sums (:func:`reconstruction_sums`, :func:`sae_quality_rows`), by
    harness.statistics.stats' one FVE formula."""
    if rows is None:
        rows = np.arange(len(sums["n"]))
    centred = centred_sum_of_squares(sums["q"][rows].sum(), sums["s"][rows].sum(0), sums["n"][rows].sum())
    return float(fraction_variance_explained(sums["sse"][rows].sum(), centred))


# --- hub SAEs --------------------------------------------------------------------------------


def load_hub_sae(
    release: str = "gpt2-small-res-jb",
    sae_id: str = "blocks.8.hook_resid_pre",
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> LoadedSAE:
    """A pretrained SAE through ``SAE.from_pretrained`` (sae-lens 6.x returns the SAE alone).

    Raises SubjectError for an unknown release/id (the directory ships with sae-lens, no network)
    and SubjectUnavailable, within one connection timeout, when the files are neither in the
    local HF cache nor downloadable.
    """
    from huggingface_hub import try_to_load_from_cache
    from sae_lens import SAE
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    from harness.evidence.errors import unavailable_errors
    from harness.models.loaders import _hub_reachable

    try:
        repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    except ValueError as exc:
        raise SubjectError(f"SAE {release}/{sae_id}: {exc}") from None
    files = [f"{folder}/{SAE_CFG_FILENAME}", f"{folder}/{SAE_WEIGHTS_FILENAME}"]
    cached = all(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files)
    where = f"SAE {release}/{sae_id} (hub repo {repo_id}, folder {folder})"
    if not cached and not _hub_reachable():
        raise SubjectUnavailable(
            f"{where}: not in the local HF cache and the hub is unreachable from this machine. "
            "Run once with hub access to fill the cache; local subjects use trained SAEs."
        )
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except unavailable_errors() as exc:  # only a missing network/file/package: the rest is an error
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise SubjectUnavailable(f"{where}: could not be loaded ({type(exc).__name__}: {first})") from None
    return LoadedSAE(sae=sae.eval(), spec=None, quality={}, origin="hub",
                     source={"release": release, "sae_id": sae_id, "repo_id": repo_id, "folder": folder})


# --- diagnostic SAEs -------------------------------------------------------------------------


def _diagnostic(name: str, state: dict[str, torch.Tensor], hook_name: str, device: str,
                **recipe: Any) -> LoadedSAE:
    d_sae, d_in = state["W_dec"].shape
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"hook_name": hook_name}}
    return LoadedSAE(sae=sae_from_state(cfg, state, device), spec=None, quality={},
                     origin="diagnostic", source={"diagnostic": name, **recipe})


def identity_sae(d_in: int, hook_name: str = "diagnostic", device: str = "cpu") -> LoadedSAE:
    """A StandardSAE reconstructing exactly: W_enc = [I, -I], W_dec = [I; -I], no biases, so
    x_hat = relu(x) - relu(-x) = x (FVE 1) with L0 = number of nonzero coordinates of x."""
    eye = torch.eye(d_in)
    state = {"W_enc": torch.cat([eye, -eye], dim=1), "b_enc": torch.zeros(2 * d_in),
             "W_dec": torch.cat([eye, -eye], dim=0), "b_dec": torch.zeros(d_in)}
    return _diagnostic("identity", state, hook_name, device, d_in=d_in)


def random_decoder_sae(d_in: int, d_sae: int, seed: int, hook_name: str = "diagnostic",
                       device: str = "cpu") -> LoadedSAE:
    """A StandardSAE with independent Gaussian encoder and unit-norm random decoder rows (its own
    generator, no global RNG): reconstructions unrelated to x, FVE far below 0."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    w_dec = torch.randn(d_sae, d_in, generator=g)
    state = {"W_enc": w_enc, "b_enc": torch.zeros(d_sae),
             "W_dec": w_dec / w_dec.norm(dim=1, keepdim=True), "b_dec": torch.zeros(d_in)}
    return _diagnostic("random-decoder", state, hook_name, device, d_in=d_in, d_sae=d_sae, seed=seed)
