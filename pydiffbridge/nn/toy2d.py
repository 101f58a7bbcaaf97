"""2-D toy densities for flow experiments, generated in code from a seed.

The four classic benchmarks of the FFJORD paper: two moons, eight Gaussians,
checkerboard and pinwheel, each scaled to roughly ``[-4, 4]²``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ._checks import check_size

__all__ = ["TOY_DATASETS", "sample_toy"]

TOY_DATASETS: tuple[str, ...] = ("moons", "8gaussians", "checkerboard", "pinwheel")


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    n_upper = n // 2
    theta = rng.uniform(0.0, np.pi, size=n)
    upper = np.arange(n) < n_upper
    x = np.where(upper, np.cos(theta), 1.0 - np.cos(theta))
    y = np.where(upper, np.sin(theta), 0.5 - np.sin(theta))
    pts = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((n, 2))
    pts = pts[rng.permutation(n)]
    return pts * 2.0 + np.array([-1.0, -0.2])


def _eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    angles = 2.0 * np.pi * np.arange(8) / 8.0
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    idx = rng.integers(0, 8, size=n)
    pts = centers[idx] + 0.5 * rng.standard_normal((n, 2))
    return pts / np.sqrt(2.0)


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x1 = rng.uniform(-2.0, 2.0, size=n)
    x2 = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n)
    x2 = x2 + np.mod(np.floor(x1), 2.0)
    return 2.0 * np.stack([x1, x2], axis=1)


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    arm = rng.integers(0, arms, size=n)
    feats = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angle = 2.0 * np.pi * arm / arms + rate * np.exp(feats[:, 0])
    c, s = np.cos(angle), np.sin(angle)
    x = c * feats[:, 0] - s * feats[:, 1]
    y = s * feats[:, 0] + c * feats[:, 1]
    return 2.0 * np.stack([x, y], axis=1)


_GENERATORS = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "pinwheel": _pinwheel,
}


def sample_toy(
    name: str, n: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Draw ``n`` points of toy dataset ``name`` (one of :data:`TOY_DATASETS`) as a
    ``[n, 2]`` tensor; the same ``seed`` gives the same points."""
    if name not in _GENERATORS:
        raise InputError(f"sample_toy(name={name!r}): unknown dataset; use one of {TOY_DATASETS}.")
    n = check_size(n, "sample_toy(n)")
    rng = np.random.default_rng(seed)
    return torch.as_tensor(_GENERATORS[name](rng, n), dtype=dtype)
