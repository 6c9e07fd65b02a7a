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

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from harness.activations.cache import ContentCache, progress
from harness.activations.capture import Batch, HookNameError, capture, check_hook_names, tokenize
from harness.activations.clamp import WHERE, Clamp, Where, clamp_hooks
from harness.activations.incremental import incremental_attention
from harness.activations.layouts import decode_layouts
from harness.activations.rerun import rerun

__all__ = ["GENERATION", "GENERATION_VERSION", "READS", "WHERE", "Clamp", "GenerationResult",
           "GenerationSpec", "Read", "Sampling", "Where", "first_divergence", "prompt_seed",
           "run_generation", "run_generations"]

GENERATION_VERSION = "1"
GENERATION = "generation"
"""The stage name (harness.evidence.stages) and the cache producer."""
Read = Literal["rerun", "generation"]
READS: tuple[str, ...] = get_args(Read)
"""How run_generations reads the generated positions: by a rerun (the source's) or while decoding."""


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
    """Rows per batch: prompts of this run, or (run, prompt) rows of the runs decoded together
    by :func:`run_generations` (part of the key: batched equals unbatched only up to float
    noise)."""

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


def _choose(logits: torch.Tensor, samplings: Sequence[Sampling | None],
            generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Next token per row from logits (b, d_vocab) -> (b,): the argmax (first index on ties)
    where ``samplings[r]`` is None, else a draw from row r's own generator."""
    out = logits.argmax(-1)  # (b,)
    for r, (s, g) in enumerate(zip(samplings, generators, strict=True)):
        if s is None:
            continue
        x = logits[r].float() / s.temperature  # (d_vocab,)
        if s.top_k is not None:
            x = x.masked_fill(x < x.topk(s.top_k).values[-1], -math.inf)
        out[r] = torch.multinomial(x.softmax(-1), 1, generator=g)[0]
    return out


def _generate(model: Any, tokens: torch.Tensor, mask: torch.Tensor, clamps: Sequence[Clamp | None],
              samplings: Sequence[Sampling | None], generators: Sequence[torch.Generator | None],
              eos: int | None, pad: int, n: int, reads: Sequence[str] = (), logprobs: bool = False):
    """Left-padded tokens/mask (b, P) -> new tokens (b, N), counts (b,), ended at EOS (b,) and
    the readings taken while decoding (empty unless ``reads``/``logprobs``): token j's hook
    values come from the forward that feeds it (one forward more than choosing needs), its
    log-probs are those it was chosen from; entries past a row's end are left to the caller."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    b, dev = tokens.shape[0], tokens.device
    new = torch.full((b, n), pad, dtype=torch.long, device=dev)  # (b, N)
    counts = torch.zeros(b, dtype=torch.long, device=dev)  # (b,)
    done = torch.zeros(b, dtype=torch.bool, device=dev)  # (b,)
    got: dict[str, torch.Tensor] = {}
    col: list[int | None] = [None]  # the generated position the current forward feeds

    def keep(act: torch.Tensor, hook: Any) -> None:  # act (b, 1, *d) while decoding
        if col[0] is None:  # the prompt's forward: no generated position
            return
        if hook.name not in got:
            got[hook.name] = torch.full((b, n, *act.shape[2:]), math.nan, device=act.device)
        got[hook.name][:, col[0]] = act[:, -1].float()

    kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, b)
    fwd = clamp_hooks(clamps, "generation") + [(h, keep) for h in reads]  # clamp first
    # hooks removed on any exit, exceptions included; incremental_attention: bit-identical
    with model.hooks(fwd_hooks=fwd), incremental_attention(model, kv, tokens.shape[1] + n):
        logits = model(tokens, attention_mask=mask, past_kv_cache=kv)[:, -1]  # (b, d_vocab)
        one = torch.ones(b, 1, dtype=mask.dtype, device=dev)  # (b, 1)
        for step in range(n):
            if logprobs:
                if "logprobs" not in got:
                    got["logprobs"] = torch.full((b, n, logits.shape[-1]), math.nan, device=dev)
                got["logprobs"][:, step] = logits.float().log_softmax(-1)
            nxt = _choose(logits, samplings, generators).to(dev).masked_fill(done, pad)  # (b,)
            new[:, step] = nxt
            counts += ~done
            if eos is not None:
                done |= nxt == eos
            last = step == n - 1 or bool(done.all())
            if last and not reads:
                break
            # ended rows keep being fed (their tokens are discarded): the batch stays rectangular
            col[0] = step
            logits = model(nxt[:, None], attention_mask=one, past_kv_cache=kv)[:, -1]
            col[0] = None
            if last:
                break
    return new, counts, done, got


def _hooks(specs: Sequence[GenerationSpec]) -> tuple[str, ...]:
    """Every run's capture hooks, in first-seen order: every row reads all of them."""
    return tuple(dict.fromkeys(h for s in specs for h in s.capture_hooks))


def _check(model: Any, specs: Sequence[GenerationSpec], batch: Batch) -> tuple[int | None, int]:
    """Errors about ``specs`` on this model, before any generation; returns (eos, pad)."""
    spec = specs[0]
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: prompts cannot be tokenized")
    hooks = _hooks(specs)
    try:
        check_hook_names(model, hooks)
    except HookNameError as exc:
        raise ValueError(str(exc)) from None
    for h in hooks:  # (batch, head, query, key): dim 1 is not the position
        if h.endswith(("hook_pattern", "hook_attn_scores")):
            raise ValueError(f"{h}: attention patterns are not read per position here")
    widths: dict[str, int] = {}
    for s in specs:
        if s.clamp is None:
            continue
        h = s.clamp.hook
        if h not in widths:
            widths[h] = capture(model, batch.tokens[:1, :1], [h])[h].shape[-1]
        if s.clamp.neuron >= widths[h]:
            raise ValueError(f"clamp.neuron {s.clamp.neuron} is out of range: {h} has {widths[h]} units")
    d_vocab = model.cfg.d_vocab
    for s in specs:
        if s.sampling and s.sampling.top_k and s.sampling.top_k > d_vocab:
            raise ValueError(f"sampling.top_k {s.sampling.top_k} exceeds d_vocab {d_vocab}")
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
def _compute(model: Any, specs: Sequence[GenerationSpec], batch: Batch, eos: int | None,
             pad: int, read: Read = "rerun") -> dict[str, torch.Tensor]:
    from harness.evidence.stages import stage

    spec, hooks = specs[0], _hooks(specs)
    dev = torch.device(model.cfg.device)
    n_prompts, n = len(spec.prompts), spec.max_new_tokens
    prompts = [batch.tokens[i, : batch.lengths[i]].to(dev) for i in range(n_prompts)]
    rows = [(s, i) for s in range(len(specs)) for i in range(n_prompts)]  # run-major
    clamps = [specs[s].clamp for s, _ in rows]
    samplings = [specs[s].sampling for s, _ in rows]
    gens = [torch.Generator(device=dev).manual_seed(prompt_seed(m.seed, i)) if m else None
            for (_, i), m in zip(rows, samplings, strict=True)]
    parts: list[dict[str, torch.Tensor]] = []
    starts = range(0, len(rows), spec.batch_size)
    runs = f"{len(specs)} runs x " if len(specs) > 1 else ""
    with stage(GENERATION), decode_layouts(model):  # bit-identical, without TL's per-step copies
        for s in progress(starts, desc=f"{GENERATION}: {runs}{n_prompts} prompts x {n} tokens",
                          total=len(starts)):
            idx = range(s, min(s + spec.batch_size, len(rows)))
            chunk = [prompts[rows[r][1]] for r in idx]
            width = max(len(r) for r in chunk)
            tokens = torch.full((len(chunk), width), pad, dtype=torch.long, device=dev)
            mask = torch.zeros(len(chunk), width, dtype=torch.long, device=dev)  # (b, P)
            for i, r in enumerate(chunk):  # left padding: every row's last token is at P - 1
                tokens[i, width - len(r):], mask[i, width - len(r):] = r, 1
            during = read == "generation"
            new, counts, stopped, got = _generate(
                model, tokens, mask, [clamps[r] for r in idx], [samplings[r] for r in idx],
                [gens[r] for r in idx], eos, pad, n, reads=hooks if during else (),
                logprobs=spec.logprobs and during)
            if not during:
                got = rerun(model, chunk, new, counts, pad, [clamps[r] for r in idx], hooks,
                             spec.logprobs)
            parts.append({"new_tokens": new, "new_lengths": counts, "stopped": stopped, **got})
    out = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}
    valid = torch.arange(n)[None, :] < out["new_lengths"][:, None]  # (n_rows, N)
    for h in (*hooks, "logprobs"):  # read while decoding: NaN past each row's end, as reread
        if h in out and read == "generation":
            out[h] = out[h].masked_fill(~valid.view(*valid.shape, *[1] * (out[h].ndim - 2)), math.nan)
    for h in hooks:
        a = out[h] if spec.per_token else out.pop(h)  # (n_rows, N, *d), NaN past the end
        w = valid.view(*valid.shape, *[1] * (a.ndim - 2))
        out[f"mean/{h}"] = torch.where(w, a, 0.0).sum(1) / w.sum(1)  # (n_rows, *d)
    out.update(prompt_tokens=batch.tokens.cpu(), prompt_lengths=batch.lengths.cpu())
    return out


def _results(specs: Sequence[GenerationSpec], t: dict[str, torch.Tensor]) -> list[GenerationResult]:
    """One result per run from the run-major rows of ``t``."""
    n_prompts = t["prompt_lengths"].shape[0]
    out = []
    for s, spec in enumerate(specs):
        rows = slice(s * n_prompts, (s + 1) * n_prompts)
        hooks = spec.capture_hooks
        out.append(GenerationResult(
            spec=spec, prompt_tokens=t["prompt_tokens"], prompt_lengths=t["prompt_lengths"],
            new_tokens=t["new_tokens"][rows], new_lengths=t["new_lengths"][rows],
            stopped=t["stopped"][rows], means={h: t[f"mean/{h}"][rows] for h in hooks},
            per_token={h: t[h][rows] for h in hooks} if spec.per_token else {},
            logprobs=t["logprobs"][rows] if "logprobs" in t else None))
    return out


def run_generation(model: Any, spec: GenerationSpec, *, cache: ContentCache | None = None,
                   subject: str | None = None) -> GenerationResult:
    """Generate, rerun and read ``spec`` on ``model`` (a HookedTransformer, on its own device
    and dtype); through ``cache`` when given, keyed by ``subject`` (the subject's weight
    identity, e.g. ``LoadedSubject.weight_hash``), the spec, the prompt token ids and the
    torch / transformer-lens versions. Raises ValueError on a spec this model cannot run."""
    return run_generations(model, (spec,), cache=cache, subject=subject)[0]


def run_generations(model: Any, specs: Sequence[GenerationSpec], *, read: Read = "rerun",
                    cache: ContentCache | None = None,
                    subject: str | None = None) -> list[GenerationResult]:
    """Several runs of one prompt set that differ only in their clamp and sampling (a dose
    grid, its controls, sampling seeds), decoded together: the rows (run s, prompt i),
    run-major, go through the model ``batch_size`` rows at a time, each row under its own
    clamp and sampling (a row's greedy tokens and seeded draws are those of its run alone, up
    to float rounding). One result per run, in order. With ``batch_size`` a multiple of the
    number of prompts every batch holds whole runs, so all runs see the same padding.

    ``read``: "rerun" (the source's protocol: rerun prompt + generated tokens under each run's
    rerun clamp, then read) or "generation" (read while decoding, with no rerun: equal to the
    rerun up to float rounding, half the cost; only for runs whose clamp, if any, is "both").
    Cached as one entry (keyed as :func:`run_generation`, by every run and ``read``); a single
    run read by rerun keeps :func:`run_generation`'s key."""
    specs = tuple(specs)
    if not specs:
        raise ValueError("no runs to generate")
    if read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    shared = dataclasses.replace(specs[0], clamp=None, sampling=None)
    for k, s in enumerate(specs):
        if dataclasses.replace(s, clamp=None, sampling=None) != shared:
            raise ValueError(f"run {k} differs from run 0 in more than its clamp and sampling: runs "
                             "decoded together share prompts, max_new_tokens, hooks, flags and batch_size")
        if read == "generation" and s.clamp is not None and s.clamp.where != "both":
            raise ValueError(f"run {k}: read='generation' reads what the generation computed, so its "
                             f"clamp must apply in both phases, not {s.clamp.where!r}")
    if cache is not None and not subject:
        raise ValueError("a cached run needs the subject's identity string (its weight hash)")
    batch = tokenize(model, list(shared.prompts), prepend_bos=shared.prepend_bos)
    eos, pad = _check(model, specs, batch)
    if cache is None:
        return _results(specs, _compute(model, specs, batch, eos, pad, read))
    from importlib.metadata import version

    ids = torch.cat([batch.tokens.cpu().flatten(), batch.lengths.cpu()]).numpy()
    runs = {"spec": specs[0]} if len(specs) == 1 and read == "rerun" else {"specs": list(specs),
                                                                           "read": read}
    parts = {"subject": subject, **runs, "eos": eos, "pad": pad,
             "prompt_tokens": hashlib.sha256(ids.tobytes()).hexdigest(),
             "dtype": str(model.cfg.dtype), "device": torch.device(model.cfg.device).type,
             "torch": torch.__version__, "transformer_lens": version("transformer-lens")}

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return _compute(model, specs, batch, eos, pad, read), {"hooks": list(_hooks(specs))}

    entry = cache.get_or_compute(GENERATION, GENERATION_VERSION, parts, compute)
    return _results(specs, entry.tensors)
