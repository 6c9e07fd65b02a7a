"""Trends across subjects for claims with a depth meaning: family W's agreement per layer.

Family W says agreement between weight-decoded and max-activating tokens is highest at the
shallowest layer and falls with depth; the thesis published a per-layer table (SoLU-1L/2L).
Across subjects the question is whether each subject's curve looks like that table, so the
figure draws every subject's per-layer values (W2's ``per_layer`` table; a one-layer subject,
where W2 is not applicable, from W1's and W4's layer-0 statistics) beside the published
points. The published numbers are read from the registry (``fixtures/claims.yaml``, with their
provenance), never written here: only the mapping from a per-layer column to the registry's
quantity name is.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.evidence.registry import Registry


@dataclass(frozen=True)
class Panel:
    """One agreement statistic drawn per layer."""

    key: str
    """Its column in W2's per-layer table (harness claims/test_weight_tokens.py)."""
    quantity: str
    """The registry's name of the same quantity among family W's published numbers."""
    label: str
    """Axis label."""


PANELS = (
    Panel("overlap_any", "neurons with overlap > 0", "share of neurons with overlap > 0"),
    Panel("jaccard", "mean Jaccard", "mean Jaccard of the two token sets"),
    Panel("share_dtr_1", "neurons with DTR = 1", "share of neurons with DTR = 1"),
)
FIGURE = "W_agreement_by_layer.png"


@dataclass(frozen=True)
class PublishedPoint:
    """A published per-layer number of family W (from the registry)."""

    claims: tuple[str, ...]
    """The claim ids that list it (W1 and W2 share some)."""
    quantity: str
    model: str
    """The model as the registry names it, e.g. ``solu-2l``."""
    layer: int
    value: float
    subject: str
    """The registry's subject text in full (e.g. ``solu-1l L0 (872/2048)``)."""
    provenance: str


_LAYER = re.compile(r"^(\S+) L(\d+)\b")
_PARAM = re.compile(r"\[([^\]]+)\]$")


def published_points(registry: Registry) -> list[PublishedPoint]:
    """Family W's published per-layer numbers for the panels' quantities, in registry order,
    one point per (quantity, model, layer, value) with every claim that lists it."""
    quantities = {p.quantity for p in PANELS}
    found: dict[tuple, PublishedPoint] = {}
    for claim in registry.claims.values():
        if claim.family != "W":
            continue
        for p in claim.published:
            m = _LAYER.match(p.subject)
            if p.quantity not in quantities or m is None:
                continue
            key = (p.quantity, m.group(1), int(m.group(2)), float(p.value))
            old = found.get(key)
            found[key] = PublishedPoint(
                claims=(*old.claims, claim.id) if old else (claim.id,), quantity=p.quantity,
                model=m.group(1), layer=int(m.group(2)), value=float(p.value), subject=p.subject,
                provenance=old.provenance if old else p.provenance)
    return list(found.values())


def _number(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def w_layers(doc: dict) -> dict[int, dict[str, float]]:
    """A report's family-W values by layer: {layer: {panel key: value}}.

    Layer 0 from W1 (``observed_mean`` of each agreement statistic's test) and W4
    (``share_dtr_1``), then every layer from W2's per-layer table where W2 measured one."""
    layers: dict[int, dict[str, float]] = {}
    keys = {p.key for p in PANELS}
    for r in doc.get("claims") or ():
        if not isinstance(r, dict) or r.get("verdict") in ("error", "unavailable"):
            continue
        stats = r.get("statistics") or {}
        if r.get("id") == "W1":
            m = _PARAM.search(str(r.get("test", "")))
            head = stats.get("excess_over_null") or {}
            value = _number(head.get("observed_mean"))
            if m and m.group(1) in keys and value is not None:
                layers.setdefault(0, {})[m.group(1)] = value
        elif r.get("id") == "W4" and "share_dtr_1" in stats:
            value = _number((stats["share_dtr_1"].get("estimate") or {}).get("value"))
            if value is not None:
                layers.setdefault(0, {})["share_dtr_1"] = value
    for r in doc.get("claims") or ():
        if not isinstance(r, dict) or r.get("id") != "W2":
            continue
        for s in (r.get("statistics") or {}).values():
            for row in s.get("per_layer") or ():
                entry = layers.setdefault(int(row["layer"]), {})
                entry.update({k: v for k in keys if (v := _number(row.get(k))) is not None})
    return layers


@dataclass(frozen=True)
class Series:
    """One subject's per-layer values, as drawn."""

    name: str
    """The report directory (column) name."""
    group: int
    """Its model's position among the matrix's models: a model and its twin share a colour."""
    twin: bool
    layers: dict[int, dict[str, float]]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def agreement_figure(series: list[Series], published: list[PublishedPoint], path: Path) -> Path:
    """Draw one panel per statistic: each subject's curve over layers (twins dashed, in their
    model's colour) and the published points (black, one marker per published model)."""
    from harness.evidence.figures import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.0 * len(PANELS), 4.0))
    markers = "DsP^v*X"
    models = list(dict.fromkeys(p.model for p in published))
    try:
        for ax, panel in zip(axes, PANELS, strict=True):
            for s in series:
                xs = sorted(k for k, v in s.layers.items() if panel.key in v)
                if xs:
                    ax.plot(xs, [s.layers[x][panel.key] for x in xs], color=f"C{s.group % 10}",
                            ls="--" if s.twin else "-", marker="o", ms=3, lw=1.2, label=s.name)
            for i, model in enumerate(models):
                pts = sorted((p.layer, p.value) for p in published
                             if p.model == model and p.quantity == panel.quantity)
                if pts:
                    ax.plot(*zip(*pts, strict=True), color="black", ls=":", lw=1,
                            marker=markers[i % len(markers)], ms=6, label=f"{model} (published)")
            ax.set(xlabel="layer", ylabel=panel.label, title=panel.quantity)
            ax.grid(alpha=0.3)
        handles: dict[str, object] = {}
        for ax in axes:
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, h)
        fig.legend(list(handles.values()), list(handles), loc="lower center",
                   ncol=min(len(handles), 5), fontsize=8, frameon=False)
        fig.suptitle("Family W: agreement of Method 1 and Method 2 tokens by layer "
                     "(dashed: random-init twin; black: the thesis's published table)", fontsize=10)
        fig.tight_layout(rect=(0, 0.1 + 0.03 * (len(handles) // 5), 1, 0.95))
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name of this writer's own: two runs sharing an evidence directory both
        # rewrite this figure at their end, and with one fixed name the second os.replace
        # found the first's file gone (FileNotFoundError, failing that run's report).
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=100, format="png")
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the report is for readers
            os.replace(tmp, path)  # a reader never sees half a figure
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path
