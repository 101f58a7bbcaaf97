"""The models of ``examples/odenet_mnist.py`` and its peak-memory measurement.

Models (Chen et al. 2018, Table 1): the paper's down-sampling stem (conv 3x3 to 64 channels,
then two stride-2 4x4 convs) and head (norm, ReLU, global average pool, linear) around 6
residual blocks (``resnet``), one continuous block solved by fixed-step RK4 with direct
backprop (``rknet``) or by adaptive dopri5 with the adjoint (``odenet``); and a 1-hidden-layer
MLP (``mlp``).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one training step.  On CPU,
the peak of live tensor storage bytes allocated during one training step (forward + backward
of one batch), tracked per storage by a ``TorchDispatchMode`` -- the CPU analogue of
``max_memory_allocated``, excluding parameters and the input batch that existed before.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pydiffbridge.nn.odeblock import ConvODEFunc, ODEBlock, group_norm

MODELS = ("mlp", "resnet", "rknet", "odenet")
PAPER = {"mlp": (1.60, 0.24), "resnet": (0.41, 0.60), "rknet": (0.47, 0.22),
         "odenet": (0.42, 0.22)}  # test error %, params (M) in the paper's Table 1


# ----------------------------------------------------------------------------- models
class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(relu(norm(conv(relu(norm(x))))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(group_norm(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  group_norm(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def build_model(kind: str, image_shape: tuple[int, int, int], num_classes: int = 10,
                tol: float = 1e-3, rk_steps: int = 4, channels: int = 64) -> nn.Sequential:
    """Build one of :data:`MODELS` for images of shape ``(C, H, W)``."""
    c, h, w = image_shape
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 300), nn.ReLU(),
                             nn.Linear(300, num_classes))
    stem = [nn.Conv2d(c, channels, 3, 1), group_norm(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 4, 2, 1), group_norm(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 4, 2, 1)]
    if kind == "resnet":
        features: list[nn.Module] = [ResBlock(channels) for _ in range(6)]
    elif kind == "rknet":
        features = [ODEBlock(ConvODEFunc(channels), method="rk4", gradient="direct",
                             options={"step_size": 1.0 / rk_steps})]
    elif kind == "odenet":
        features = [ODEBlock(ConvODEFunc(channels), method="dopri5", rtol=tol, atol=tol,
                             gradient="adjoint")]
    else:
        raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    head = [group_norm(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(channels, num_classes)]
    return nn.Sequential(*stem, *features, *head)


def ode_block(model: nn.Module) -> ODEBlock | None:
    return next((m for m in model.modules() if isinstance(m, ODEBlock)), None)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- memory
class LiveTensorBytes(TorchDispatchMode):
    """Track live bytes of tensor storages created inside the mode; keep the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.live[key]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def peak_step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak memory (MiB) of one forward+backward pass; see the module docstring.  ``model``
    is a plain module (not a DDP wrapper, whose backward would be a collective)."""
    model.zero_grad(set_to_none=True)
    loss_fn = nn.CrossEntropyLoss()
    if x.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(model(x), y).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        meter = LiveTensorBytes()
        with meter:
            loss_fn(model(x), y).backward()
        peak = meter.peak
    model.zero_grad(set_to_none=True)
    return peak / 2**20
