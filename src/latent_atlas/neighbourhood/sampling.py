"""Points around a centre and paths between two points, deterministic given a seed.

Radii are relative to the layer's typical norm ν (the median ‖h‖ of stored states): a sample at radius r
is ``centre + r·ν·u`` with ``u`` a unit direction drawn from one *family*:

- ``isotropic``: uniform on the sphere of R^d (a normalised standard Gaussian);
- ``local_pca``: uniform on the unit sphere of the span of the top principal components of the centre's
  nearest stored states (the directions real data varies along, locally);
- ``rogue``: uniform in the span of the rogue dimensions, the standard basis directions with the largest
  share of the cosine between stored states (METHODS §8.2);
- ``ordinary``: the same number of dimensions whose share is closest to the median share (the control).

The same unit directions are used at every radius (common random numbers: curves over radius compare
like with like), so radius 0 gives the centre itself, bit for bit. Interpolation is linear or spherical
(slerp on the raw vectors, the form used for latent walks); ``t`` outside [0, 1] extrapolates.
"""

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from latent_atlas.neighbourhood.knn import LayerStatistics

FAMILIES = ("isotropic", "local_pca", "rogue", "ordinary")
Interpolation = Literal["linear", "slerp"]
INTERPOLATIONS: tuple[Interpolation, ...] = ("linear", "slerp")


def family_seed(seed: int, *names: str) -> np.random.SeedSequence:
    """A seed sequence fixed by the config seed and names (stable across runs and machines)."""
    return np.random.SeedSequence([seed, *(zlib.crc32(name.encode()) for name in names)])


def local_principal_directions(neighbours: np.ndarray, n_components: int) -> np.ndarray:
    """Top principal directions ``(m, d)`` of a set of states (centred, full SVD in float64)."""
    centred = neighbours.astype(np.float64) - neighbours.mean(0, dtype=np.float64)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    rank = int((singular > singular[0] * 1e-10).sum()) if singular.size and singular[0] > 0 else 0
    return vt[: min(n_components, rank)]


def rogue_dimensions(statistics: LayerStatistics, n: int) -> np.ndarray:
    """The ``n`` dimensions with the largest share of the mean cosine, largest first."""
    return np.argsort(-statistics.cosine_share, kind="stable")[:n]


def ordinary_dimensions(statistics: LayerStatistics, n: int) -> np.ndarray:
    """The ``n`` dimensions whose cosine share is closest to the median share."""
    share = statistics.cosine_share
    return np.argsort(np.abs(share - np.median(share)), kind="stable")[:n]


def coordinate_basis(dimensions: np.ndarray, d_model: int) -> np.ndarray:
    """Standard basis vectors ``(m, d)`` of the given dimensions."""
    return np.eye(d_model)[np.asarray(dimensions)]


def family_bases(
    statistics: LayerStatistics,
    local_states: np.ndarray,
    families: Sequence[str] = FAMILIES,
    local_components: int = 8,
    rogue_count: int = 3,
) -> dict[str, np.ndarray]:
    """An orthonormal basis ``(m, d)`` per direction family (the isotropic family's is the identity)."""
    d_model = len(statistics.mean)
    builders = {
        "isotropic": lambda: np.eye(d_model),
        "local_pca": lambda: local_principal_directions(local_states, local_components),
        "rogue": lambda: coordinate_basis(rogue_dimensions(statistics, rogue_count), d_model),
        "ordinary": lambda: coordinate_basis(ordinary_dimensions(statistics, rogue_count), d_model),
    }
    unknown = [family for family in families if family not in builders]
    if unknown:
        raise ValueError(f"unknown direction families {unknown}; use {', '.join(FAMILIES)}")
    return {family: builders[family]() for family in families}


def unit_directions(basis: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` directions uniform on the unit sphere of the span of ``basis`` rows, shape ``(n, d)``."""
    coefficients = rng.standard_normal((n, len(basis)))
    directions = coefficients @ basis
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


@dataclass(frozen=True)
class Samples:
    """States around a centre: ``vectors[i]`` is sample ``index[i]`` of ``family[i]`` at ``radius[i]``."""

    vectors: np.ndarray  # (S, d) float32
    family: list[str]
    radius: np.ndarray  # (S,) relative to the typical norm
    index: np.ndarray  # (S,) sample number within (family, radius): the same direction at every radius


def sample_around(
    centre: np.ndarray,
    bases: Mapping[str, np.ndarray],
    radii: Sequence[float],
    n_samples: int,
    typical_norm: float,
    seed: int,
    point: str,
) -> Samples:
    """Samples at every radius along ``n_samples`` fixed directions of each family.

    The directions of a family depend only on ``(seed, point, family)``.
    """
    centre64 = centre.astype(np.float64)
    vectors, families, radius, index = [], [], [], []
    for family, basis in bases.items():
        if not len(basis):
            continue
        directions = unit_directions(basis, n_samples, np.random.default_rng(family_seed(seed, point, family)))
        for r in radii:
            vectors.append(centre64 + (float(r) * typical_norm) * directions)
            families += [family] * n_samples
            radius += [float(r)] * n_samples
            index += list(range(n_samples))
    return Samples(
        np.concatenate(vectors).astype(np.float32), families, np.asarray(radius), np.asarray(index, dtype=np.int64)
    )


def path_positions(steps: int, extrapolation: int = 0) -> np.ndarray:
    """``t = i / steps`` for ``i`` in ``-extrapolation .. steps + extrapolation`` (0 and 1 exact)."""
    if steps < 1:
        raise ValueError(f"a path needs at least 1 step, got {steps}")
    return np.arange(-extrapolation, steps + extrapolation + 1) / steps


def interpolate(start: np.ndarray, end: np.ndarray, t: np.ndarray, method: Interpolation = "linear") -> np.ndarray:
    """Points ``(len(t), d)`` along the path from ``start`` (t=0) to ``end`` (t=1), float32.

    ``linear``: (1−t)·a + t·b. ``slerp``: sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b with θ the angle between
    a and b (a great circle when the norms are equal); nearly parallel endpoints fall back to linear.
    Both reproduce the endpoints exactly at t = 0 and t = 1.
    """
    a, b, t = start.astype(np.float64), end.astype(np.float64), np.asarray(t, dtype=np.float64)[:, None]
    if method not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}; use {', '.join(INTERPOLATIONS)}")
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    theta = float(np.arccos(np.clip(cosine, -1.0, 1.0)))
    if method == "linear" or np.sin(theta) < 1e-6:
        return ((1 - t) * a + t * b).astype(np.float32)
    return (np.sin((1 - t) * theta) / np.sin(theta) * a + np.sin(t * theta) / np.sin(theta) * b).astype(np.float32)
