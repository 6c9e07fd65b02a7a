"""Generation under a neuron clamp, then a rerun that reads the generated positions (family N).

The source's protocol (CLAIMS.md, family N): prompts tokenized without BOS; 50 new tokens,
greedy, stop at EOS; ``hook_post[:, :, n] = v`` at every position during generation AND during
a rerun of the full sequence; ``hook_post`` at the generated positions only, averaged per
prompt. The baseline is no hook at all (``clamp=None``), a different run from v = 0.

The decoding loop is written here over TransformerLens' own KV cache
(``TransformerLensKeyValueCache`` with ``forward(past_kv_cache=..., attention_mask=...)``, which
handles the masked keys and the position offsets of left padding, absolute and rotary) instead
of calling ``HookedTransformer.generate``, because TL 3.9's generate (1) samples with the global
torch RNG: seeding it is global state, and a prompt's sample then depends on its batch-mates;
here every prompt has its own ``torch.Generator`` seeded from (seed, prompt index), so batching
changes nothing; (2) infers padding from token values (``get_attention_mask``: leading tokens
equal to the pad id are padding, and GPT-2's pad id is its EOS), where here the mask comes from
each prompt's own length; (3) does not say where each row stopped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from harness.activations.cache import ContentCache, progress
from harness.activations.capture import (
    Batch,
    HookNameError,
    capture,
    check_hook_names,
    last_layer_needed,
    tokenize,
)

__all__ = ["GENERATION", "GENERATION_VERSION", "Clamp", "GenerationResult", "GenerationSpec",
           "Sampling", "Where", "first_divergence", "prompt_seed", "run_generation"]

GENERATION_VERSION = "1"
GENERATION = "generation"
"""The stage name (harness.evidence.stages) and the cache producer."""
Where = Literal["both", "generation-only", "rerun-only"]
WHERE: tuple[str, ...] = get_args(Where)


@dataclass(frozen=True)
class Clamp:
    """``act[..., neuron] = value`` at every position (prompt and generated) of ``hook``."""

    hook: str
    """Hook name, e.g. ``blocks.11.mlp.hook_post``."""
    neuron: int
    """Index into the hook's last dimension."""
    value: float
    """The clamped value v. v = 0 is a run like any other; the baseline is ``clamp=None``."""
    where: Where = "both"
    """"both" (generation and rerun: the source's choice), "generation-only" or "rerun-only"
    (claim N3 separates what the clamp does to the text from what it does to the reading)."""

    def __post_init__(self) -> None:
        if self.where not in WHERE:
            raise ValueError(f"clamp.where must be one of {WHERE}, got {self.where!r}")
        if isinstance(self.neuron, bool) or not isinstance(self.neuron, int) or self.neuron < 0:
            raise ValueError(f"clamp.neuron must be an int >= 0, got {self.neuron!r}")
        if not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"clamp.value must be a finite number, got {self.value!r}")
        object.__setattr__(self, "value", float(self.value))  # 3 and 3.0: one cache key


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling (the noise control): a token ~ softmax(logits / temperature) restricted
    to the top_k logits (every logit tied with the k-th is kept)."""

    seed: int
    """Prompt i draws from its own generator, seeded from (seed, i): see :func:`prompt_seed`."""
    top_k: int | None = None
    """None: the whole vocabulary."""
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"sampling.seed must be an int >= 0, got {self.seed!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"sampling.top_k must be >= 1 or None, got {self.top_k}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be finite and > 0, got {self.temperature}")


@dataclass(frozen=True)
class GenerationSpec:
    """One run: generate from every prompt (under ``clamp`` if it applies to generation), then
    rerun prompt + generated tokens (under ``clamp`` if it applies to the rerun) and read
    ``capture_hooks`` (and the log-probs) at the generated positions."""

    prompts: tuple[str, ...]
    """The prompts (any sequence of str; kept as a tuple)."""
    max_new_tokens: int = 50
    sampling: Sampling | None = None
    """None: greedy (argmax, first index on ties)."""
    clamp: Clamp | None = None
    """None: the baseline, with no hook at all."""
    hooks: tuple[str, ...] = ()
    """Hooks read in the rerun besides the clamp's own (e.g. ``blocks.11.hook_resid_post``)."""
    per_token: bool = False
    """Also return the per-token vectors (claim N5), not only their per-prompt means."""
    logprobs: bool = False
    """Also return log p(. | prompt, new[:j]) for each generated token j (claim N3's KL):
    n_prompts x max_new_tokens x d_vocab float32 (gpt2: 10 MB per prompt at 50 tokens)."""
    prepend_bos: bool = False
    """The source tokenizes without BOS."""
    stop_at_eos: bool = True
    eos_token_id: int | None = None
    """None: the tokenizer's EOS."""
    batch_size: int = 8
    """Prompts per batch (part of the key: batched equals unbatched only up to float noise)."""

    def __post_init__(self) -> None:
        for name in ("prompts", "hooks"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a sequence of strings, not one string")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "hooks", tuple(self.hooks))
        if not self.prompts:
            raise ValueError("no prompts to generate from")
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty or not a string: {p!r}")
        if isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def capture_hooks(self) -> tuple[str, ...]:
        """The clamp's hook first (always read), then ``hooks``, without repeats."""
        first = (self.clamp.hook,) if self.clamp is not None else ()
        return tuple(dict.fromkeys(first + self.hooks))


@dataclass(frozen=True, eq=False)
class GenerationResult:
    """What a run produced, on the CPU. Rows follow ``spec.prompts``; position j is the j-th
    generated token; entries past a row's ``new_lengths`` are NaN (floats) or the pad id."""

    spec: GenerationSpec
    prompt_tokens: torch.Tensor  # (n_prompts, max_prompt_len) int64, right-padded
    prompt_lengths: torch.Tensor  # (n_prompts,) int64
    new_tokens: torch.Tensor  # (n_prompts, max_new_tokens) int64
    new_lengths: torch.Tensor  # (n_prompts,) int64 in 1..max_new_tokens, an EOS included
    stopped: torch.Tensor  # (n_prompts,) bool: the row ended at EOS
    means: dict[str, torch.Tensor] = field(default_factory=dict)  # hook -> (n_prompts, *d) f32
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    """hook -> (n_prompts, max_new_tokens, *d) float32; empty unless ``spec.per_token``."""
    logprobs: torch.Tensor | None = None  # (n_prompts, max_new_tokens, d_vocab) float32
    """[i, j] = log p(. | prompt i, new[i, :j]) in the rerun: the distribution token j was
    chosen from (exactly so when the rerun has the generation's clamp); None unless asked."""

    @property
    def new_mask(self) -> torch.Tensor:  # (n_prompts, max_new_tokens) bool, True at generated
        return torch.arange(self.new_tokens.shape[1])[None, :] < self.new_lengths[:, None]

    def sequence(self, i: int) -> torch.Tensor:  # (prompt_len_i + new_len_i,) what was rerun
        return torch.cat([self.prompt_tokens[i, : self.prompt_lengths[i]],
                          self.new_tokens[i, : self.new_lengths[i]]])


def first_divergence(a: GenerationResult, b: GenerationResult) -> torch.Tensor:
    """(n_prompts,) the first generated position where the two runs' tokens differ (one row
    having ended counts as a difference), -1 where they agree throughout."""
    ma, mb = a.new_mask, b.new_mask  # (n_prompts, max_new_tokens) each
    if ma.shape != mb.shape:
        raise ValueError(f"runs of different shapes: {tuple(ma.shape)} vs {tuple(mb.shape)}")
    differ = (ma != mb) | (ma & mb & (a.new_tokens != b.new_tokens))
    return torch.where(differ.any(1), differ.int().argmax(1), -1)


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index``'s generator: independent streams for any (seed, index)."""
    digest = hashlib.sha256(f"generation/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _clamp_hook(clamp: Clamp):
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:  # act (batch, pos, ..., d)
        act[..., clamp.neuron] = clamp.value
        return act
    return hook


def _choose(logits: torch.Tensor, sampling: Sampling | None,
            generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token per row from logits (b, d_vocab) -> (b,)."""
    if sampling is None:
        return logits.argmax(-1)
    x = logits.float() / sampling.temperature  # (b, d_vocab)
    if sampling.top_k is not None:
        kth = x.topk(sampling.top_k, dim=-1).values[:, -1:]  # (b, 1)
        x = x.masked_fill(x < kth, -math.inf)
    probs = x.softmax(-1)  # (b, d_vocab)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators,
                                                                            strict=True)])


def _generate(model: Any, spec: GenerationSpec, tokens: torch.Tensor, mask: torch.Tensor,
              generators: Sequence[torch.Generator], eos: int | None, pad: int):
    """Left-padded tokens/mask (b, P) -> new tokens (b, N), counts (b,), ended at EOS (b,)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    b, n, dev = tokens.shape[0], spec.max_new_tokens, tokens.device
    new = torch.full((b, n), pad, dtype=torch.long, device=dev)  # (b, N)
    counts = torch.zeros(b, dtype=torch.long, device=dev)  # (b,)
    done = torch.zeros(b, dtype=torch.bool, device=dev)  # (b,)
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, b)
    clamp = spec.clamp
    fwd = [(clamp.hook, _clamp_hook(clamp))] if clamp and clamp.where != "rerun-only" else []
    with model.hooks(fwd_hooks=fwd):  # removed on any exit, exceptions included
        logits = model(tokens, attention_mask=mask, past_kv_cache=kv)[:, -1]  # (b, d_vocab)
        one = torch.ones(b, 1, dtype=mask.dtype, device=dev)  # (b, 1)
        for step in range(n):
            nxt = _choose(logits, spec.sampling, generators).to(dev).masked_fill(done, pad)  # (b,)
            new[:, step] = nxt
            counts += ~done
            if eos is not None:
                done |= nxt == eos
            if step == n - 1 or bool(done.all()):
                break
            # ended rows keep being fed (their tokens are discarded): the batch stays rectangular
            logits = model(nxt[:, None], attention_mask=one, past_kv_cache=kv)[:, -1]
    return new, counts, done


def _rerun(model: Any, spec: GenerationSpec, prompts: list[torch.Tensor], new: torch.Tensor,
           counts: torch.Tensor, pad: int) -> dict[str, torch.Tensor]:
    """Run prompt + generated once more (right-padded: pads come after every real token, so
    causal attention never sees them), reading the generated positions only."""
    b, n, dev = new.shape[0], spec.max_new_tokens, new.device
    lengths = torch.tensor([len(p) for p in prompts], device=dev)  # (b,)
    total = lengths + counts  # (b,)
    seq = torch.full((b, int(total.max())), pad, dtype=torch.long, device=dev)  # (b, T)
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = p
        seq[i, len(p): total[i]] = new[i, : counts[i]]
    mask = (torch.arange(seq.shape[1], device=dev)[None] < total[:, None]).long()  # (b, T)
    steps = torch.arange(n, device=dev)[None]  # (1, N)
    valid = steps < counts[:, None]  # (b, N)
    at = (lengths[:, None] + steps).clamp(max=seq.shape[1] - 1)  # (b, N) generated positions
    got: dict[str, torch.Tensor] = {}

    def take(act: torch.Tensor, shift: int = 0) -> torch.Tensor:  # (b, T, *d) -> (b, N, *d)
        out = act[torch.arange(b, device=act.device)[:, None], (at - shift).to(act.device)]
        return out.float().masked_fill(~valid.view(b, n, *[1] * (act.ndim - 2)).to(act.device),
                                       math.nan)

    def keep(act: torch.Tensor, hook: Any) -> None:
        got[hook.name] = take(act)

    hooks = spec.capture_hooks
    clamp = spec.clamp
    fwd = [(clamp.hook, _clamp_hook(clamp))] if clamp and clamp.where != "generation-only" else []
    if not hooks and not spec.logprobs:
        return got
    with model.hooks(fwd_hooks=fwd + [(h, keep) for h in hooks]):  # clamp first: read after it
        if spec.logprobs:
            logits = model(seq, attention_mask=mask)  # (b, T, d_vocab)
            # log p(token j | prompt, new[:j]) is read at the position before token j
            got["logprobs"] = take(logits, shift=1).log_softmax(-1)
        else:
            model(seq, attention_mask=mask, stop_at_layer=last_layer_needed(model, hooks))
    return got


def _check(model: Any, spec: GenerationSpec, batch: Batch) -> tuple[int | None, int]:
    """Errors about ``spec`` on this model, before any generation; returns (eos, pad)."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: prompts cannot be tokenized")
    try:
        check_hook_names(model, spec.capture_hooks)
    except HookNameError as exc:
        raise ValueError(str(exc)) from None
    for h in spec.capture_hooks:  # (batch, head, query, key): dim 1 is not the position
        if h.endswith(("hook_pattern", "hook_attn_scores")):
            raise ValueError(f"{h}: attention patterns are not read per position here")
    if spec.clamp is not None:
        width = capture(model, batch.tokens[:1, :1], [spec.clamp.hook])[spec.clamp.hook].shape[-1]
        if spec.clamp.neuron >= width:
            raise ValueError(f"clamp.neuron {spec.clamp.neuron} is out of range: "
                             f"{spec.clamp.hook} has {width} units")
    d_vocab = model.cfg.d_vocab
    if spec.sampling and spec.sampling.top_k and spec.sampling.top_k > d_vocab:
        raise ValueError(f"sampling.top_k {spec.sampling.top_k} exceeds d_vocab {d_vocab}")
    longest = int(batch.lengths.max())
    if longest + spec.max_new_tokens > model.cfg.n_ctx:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens "
                         f"({spec.max_new_tokens}) exceeds the context length {model.cfg.n_ctx}")
    eos = spec.eos_token_id if spec.eos_token_id is not None else model.tokenizer.eos_token_id
    if spec.stop_at_eos and (eos is None or not 0 <= eos < d_vocab):
        raise ValueError(f"stop_at_eos needs an EOS id in [0, {d_vocab}), got {eos!r}")
    pad = model.tokenizer.pad_token_id
    return (eos if spec.stop_at_eos else None), (pad if pad is not None else 0)


@torch.no_grad()
def _compute(model: Any, spec: GenerationSpec, batch: Batch, eos: int | None,
             pad: int) -> dict[str, torch.Tensor]:
    from harness.evidence.stages import stage

    dev = torch.device(model.cfg.device)
    n_prompts, n = len(spec.prompts), spec.max_new_tokens
    rows = [batch.tokens[i, : batch.lengths[i]].to(dev) for i in range(n_prompts)]
    gens = [torch.Generator(device=dev).manual_seed(prompt_seed(spec.sampling.seed, i))
            for i in range(n_prompts)] if spec.sampling else [None] * n_prompts
    parts: list[dict[str, torch.Tensor]] = []
    starts = range(0, n_prompts, spec.batch_size)
    with stage(GENERATION):
        for s in progress(starts, desc=f"{GENERATION}: {n_prompts} prompts x {n} tokens",
                          total=len(starts)):
            chunk = rows[s: s + spec.batch_size]
            width = max(len(r) for r in chunk)
            tokens = torch.full((len(chunk), width), pad, dtype=torch.long, device=dev)
            mask = torch.zeros(len(chunk), width, dtype=torch.long, device=dev)  # (b, P)
            for i, r in enumerate(chunk):  # left padding: every row's last token is at P - 1
                tokens[i, width - len(r):], mask[i, width - len(r):] = r, 1
            new, counts, stopped = _generate(model, spec, tokens, mask, gens[s: s + len(chunk)],
                                             eos, pad)
            read = _rerun(model, spec, chunk, new, counts, pad)
            parts.append({"new_tokens": new, "new_lengths": counts, "stopped": stopped, **read})
    out = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
    valid = torch.arange(n)[None, :] < out["new_lengths"][:, None]  # (n_prompts, N)
    for h in spec.capture_hooks:
        a = out[h] if spec.per_token else out.pop(h)  # (n_prompts, N, *d), NaN past the end
        w = valid.view(*valid.shape, *[1] * (a.ndim - 2))
        out[f"mean/{h}"] = torch.where(w, a, 0.0).sum(1) / w.sum(1)  # (n_prompts, *d)
    out.update(prompt_tokens=batch.tokens.cpu(), prompt_lengths=batch.lengths.cpu())
    return out


def _result(spec: GenerationSpec, t: dict[str, torch.Tensor]) -> GenerationResult:
    hooks = spec.capture_hooks
    return GenerationResult(
        spec=spec, prompt_tokens=t["prompt_tokens"], prompt_lengths=t["prompt_lengths"],
        new_tokens=t["new_tokens"], new_lengths=t["new_lengths"], stopped=t["stopped"],
        means={h: t[f"mean/{h}"] for h in hooks},
        per_token={h: t[h] for h in hooks} if spec.per_token else {},
        logprobs=t.get("logprobs"))


def run_generation(model: Any, spec: GenerationSpec, *, cache: ContentCache | None = None,
                   subject: str | None = None) -> GenerationResult:
    """Generate, rerun and read ``spec`` on ``model`` (a HookedTransformer, on its own device
    and dtype); through ``cache`` when given, keyed by ``subject`` (the subject's weight
    identity, e.g. ``LoadedSubject.weight_hash``), the spec, the prompt token ids and the
    torch / transformer-lens versions. Raises ValueError on a spec this model cannot run."""
    if cache is not None and not subject:
        raise ValueError("a cached run needs the subject's identity string (its weight hash)")
    batch = tokenize(model, list(spec.prompts), prepend_bos=spec.prepend_bos)
    eos, pad = _check(model, spec, batch)
    if cache is None:
        return _result(spec, _compute(model, spec, batch, eos, pad))
    from importlib.metadata import version

    ids = torch.cat([batch.tokens.cpu().flatten(), batch.lengths.cpu()]).numpy()
    parts = {"subject": subject, "spec": spec, "eos": eos, "pad": pad,
             "prompt_tokens": hashlib.sha256(ids.tobytes()).hexdigest(),
             "dtype": str(model.cfg.dtype), "device": torch.device(model.cfg.device).type,
             "torch": torch.__version__, "transformer_lens": version("transformer-lens")}

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return _compute(model, spec, batch, eos, pad), {"hooks": list(spec.capture_hooks)}

    entry = cache.get_or_compute(GENERATION, GENERATION_VERSION, parts, compute)
    return _result(spec, entry.tensors)
