"""Right-hand sides and closed forms shared by the gradient tests (one copy of each)."""

from __future__ import annotations

import math

import torch

DT = torch.float64


def vanloan(A: torch.Tensor, c: torch.Tensor, y0: torch.Tensor, T: float) -> torch.Tensor:
    """d(c·expm(A T) y0)/dA = ∫_0^T expm(Aᵀ(T-s)) c y0ᵀ expm(Aᵀ s) ds, the upper-right block
    of expm([[AᵀT, c y0ᵀ T], [0, AᵀT]]) (Van Loan 1978)."""
    n = A.shape[0]
    M = torch.zeros(2 * n, 2 * n, dtype=A.dtype)
    M[:n, :n] = A.T * T
    M[n:, n:] = A.T * T
    M[:n, n:] = torch.outer(c, y0) * T
    return torch.linalg.matrix_exp(M)[:n, n:]


def rotated(k: float) -> torch.Tensor:
    """A symmetric 2x2 matrix with eigenvalues -1 and -k, eigenvectors at 45 degrees."""
    c = s = math.sqrt(0.5)
    R = torch.tensor([[c, -s], [s, c]], dtype=DT)
    return R @ torch.diag(torch.tensor([-1.0, -k], dtype=DT)) @ R.T


class Linear(torch.nn.Module):
    """dy/dt = A y with A a parameter: y(t) = expm(A t) y0."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t, y):
        return self.A @ y


class MLP(torch.nn.Module):
    """dy/dt = W2 tanh(W1 y + b1) + amp sin(freq t), seeded, float64; counts its calls."""

    def __init__(self, dim: int = 2, hidden: int = 16, seed: int = 0, scale: float = 0.5,
                 amp: float = 0.1, freq: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=DT) * scale)
        self.b1 = torch.nn.Parameter(torch.randn(hidden, generator=g, dtype=DT) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=DT) * scale)
        self.amp, self.freq = amp, freq
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.w2 @ torch.tanh(self.w1 @ y + self.b1) + self.amp * torch.sin(self.freq * t)


class Decay(torch.nn.Module):
    """dy/dt = -k y (each tensor of a tuple state alike), k a parameter; counts its calls."""

    def __init__(self, k: float = 1.0):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=DT))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        if isinstance(y, tuple):
            return tuple(-self.k * v for v in y)
        return -self.k * y
