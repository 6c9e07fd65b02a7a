"""A plane of R^d for the spotlight sweeps of :mod:`harness.analyses.srm` (claims family N): two
coordinate axes (e_i, e_j), e.g. neurons 373 and 2202 of an MLP layer, read by indexing; or any
two orthonormal d-vectors (rows b1, b2), read by one (n, d) x (d, 2) product. Angles in the plane
are measured from b1 towards b2.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

ORTHONORMAL_ATOL = 1e-6
"""Largest |B B^T - I| accepted for a plane given by vectors."""


@dataclass(frozen=True, eq=False)
class Plane:
    """A plane of R^d: two coordinate axes (e_i, e_j), or two orthonormal vectors."""

    d: int
    """Dimension of the space."""
    indices: tuple[int, int] | None = None
    """(i, j): the plane (e_i, e_j), read by indexing, no product. Exclusive with ``vectors``."""
    vectors: Tensor | None = None
    """(2, d) float64, rows b1, b2 orthonormal to ORTHONORMAL_ATOL. Exclusive with ``indices``."""

    def __post_init__(self) -> None:
        if (self.indices is None) == (self.vectors is None):
            raise ValueError("give exactly one of indices=(i, j) or vectors=(2, d)")
        if self.indices is not None:
            i, j = self.indices
            if not (0 <= i < self.d and 0 <= j < self.d):
                raise ValueError(f"plane indices {self.indices} out of range 0..{self.d - 1}")
            if i == j:
                raise ValueError(f"plane indices must differ, got i == j == {i}")
            return
        if self.vectors.shape != (2, self.d) or self.vectors.dtype != torch.float64:
            raise ValueError(
                f"vectors must be (2, {self.d}) float64, got "
                f"{tuple(self.vectors.shape)} {self.vectors.dtype}"
            )
        gram = self.vectors @ self.vectors.T  # (2, 2)
        err = float((gram - torch.eye(2, dtype=gram.dtype, device=gram.device)).abs().max())
        if not err <= ORTHONORMAL_ATOL:  # NaN fails too
            raise ValueError(
                f"plane vectors are not orthonormal (max |B B^T - I| = {err:.3g}): "
                "use Plane.spanned_by(u, v, orthonormalise=True)"
            )

    @classmethod
    def coordinates(cls, i: int, j: int, d: int) -> Plane:
        """The plane (e_i, e_j): theta = 0 at e_i, 90 at e_j."""
        try:
            return cls(d, indices=(operator.index(i), operator.index(j)))
        except TypeError:
            raise ValueError(f"plane indices must be integers, got ({i!r}, {j!r})") from None

    @classmethod
    def spanned_by(
        cls, u: Tensor, v: Tensor, *, orthonormalise: bool = False, rtol: float = 1e-6
    ) -> Plane:
        """The plane (u, v). orthonormalise: Gram-Schmidt (b1 = u/|u|, b2 = v's part orthogonal
        to u, normalised), refusing v whose orthogonal part is below rtol |v| (dependent)."""
        u, v = (torch.as_tensor(w, dtype=torch.float64).detach() for w in (u, v))
        if u.ndim != 1 or u.shape != v.shape:
            raise ValueError(f"need two (d,) vectors, got {tuple(u.shape)} and {tuple(v.shape)}")
        if not bool(torch.isfinite(u).all() and torch.isfinite(v).all()):
            raise ValueError("plane vectors have NaN or infinite entries")
        if orthonormalise:
            nu, nv = float(u.norm()), float(v.norm())
            if nu == 0 or nv == 0:
                raise ValueError("plane vectors must be nonzero")
            u = u / nu
            v = v - (v @ u) * u  # (d,)
            if not float(v.norm()) > rtol * nv:
                raise ValueError("plane vectors are linearly dependent: they span no plane")
            v = v / v.norm()
        return cls(u.numel(), vectors=torch.stack([u, v]))

    def rotated(self, degrees: float) -> Plane:
        """The basis turned by alpha in its own plane: b1' = cos a b1 + sin a b2, b2' = -sin a b1
        + cos a b2, so the spotlight s'(theta) = s(theta + alpha)."""
        a = math.radians(degrees)
        rot = torch.tensor(
            [[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]], dtype=torch.float64
        )
        b = self.basis()  # (2, d)
        return Plane(self.d, vectors=rot.to(b.device) @ b)

    def basis(self) -> Tensor:
        """(2, d) float64 rows b1, b2."""
        if self.vectors is not None:
            return self.vectors
        b = torch.zeros(2, self.d, dtype=torch.float64)
        b[0, self.indices[0]] = b[1, self.indices[1]] = 1.0
        return b

    def project(self, x: Tensor) -> Tensor:
        """(n, d) -> (n, 2): (<x, b1>, <x, b2>) per row, in x's dtype and on its device."""
        if self.indices is not None:
            return x[:, list(self.indices)]  # (n, 2)
        return x @ self.vectors.to(dtype=x.dtype, device=x.device).T  # (n, 2)


PlaneLike = Plane | tuple[int, int]
"""A :class:`Plane`, or coordinate indices (i, j) for ``Plane.coordinates(i, j, d)``."""


def as_plane(plane: PlaneLike, d: int) -> Plane:
    """``plane`` as a :class:`Plane` of R^d (indices (i, j) become the plane (e_i, e_j))."""
    p = plane if isinstance(plane, Plane) else Plane.coordinates(*plane, d=d)
    if p.d != d:
        raise ValueError(f"the plane lives in dimension {p.d}, the vectors in {d}")
    return p
