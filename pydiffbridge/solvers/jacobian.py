"""``f(t, y)``, ``J = df/dy`` and ``df/dt`` for the stiff solvers (rosenbrock.py, esdirk.py,
autoswitch.py), by autograd, finite differences or the user's ``jac``.

* ``"autograd"`` (default): one evaluation of ``f`` and ``n`` vector-Jacobian products, batched
  by ``is_grads_batched`` (one row at a time when ``f`` cannot be vmapped).  With autograd on,
  the products keep their graph (``create_graph``), so direct backprop through a Rosenbrock
  step sees ``dJ/dy`` and ``dJ/dp``.  A result that carries no graph at all although ``f`` was
  called on a leaf that requires grad means ``f`` detaches its input (the adjoint's augmented
  right-hand side does); then ``J`` comes from finite differences instead of being taken as 0.
* ``"fd"``: forward differences, ``n`` extra evaluations, increment
  ``sqrt(eps) max(|y_j|, 1e-3)`` (Hairer & Wanner, *Solving ODEs II*, Sec. IV.8, the
  increments of RADAU5's numerical Jacobian).
* a callable ``options["jac"](t, y) -> (n, n)`` (or ``options["jacobian"]`` itself).

``df/dt`` (needed by Rosenbrock methods on non-autonomous problems) comes from the same
autograd call (a ``None`` gradient: autonomous) or from one forward difference;
``options["autonomous"] = True`` skips it.

``options["jac_blocks"] = B`` declares the flat state to be ``B`` independent systems of
``m = n / B`` components each (a batch of problems solved with one shared step size): ``J`` is
then block diagonal, kept as ``(B, m, m)`` and factorised block by block
(:func:`lu_of`/:func:`lu_apply`); autograd needs ``m`` vector-Jacobian products (the unit
vector ``e_i`` of every block at once), differences ``m`` evaluations, a user ``jac`` returns
``(B, m, m)``, and ``df/dt`` is always a forward difference (one evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InputError

__all__ = ["Derivatives", "check_jacobian_option", "lu_of", "lu_apply", "batched_vjp"]


def batched_vjp(out: torch.Tensor, inputs: tuple, cots: torch.Tensor, **kw) -> tuple:
    """``torch.autograd.grad(out, inputs, cots[r])`` for every row ``r`` of ``cots``, stacked
    per input (``None`` for an unused input): one batched call (``is_grads_batched``), or one
    call a row where ``out``'s graph cannot be vmapped.  ``kw``: ``autograd.grad``'s options
    (``allow_unused`` is always on)."""
    kw = {**kw, "allow_unused": True}
    try:
        return torch.autograd.grad(out, inputs, cots, is_grads_batched=True, **kw)
    except RuntimeError:  # not vmap-able: one product a row
        rows = [torch.autograd.grad(out, inputs, c, **{**kw, "retain_graph": True})
                for c in cots]
        return tuple(None if rows[0][k] is None else torch.stack([r[k] for r in rows])
                     for k in range(len(inputs)))


def lu_of(J: torch.Tensor, diag: float, scale: float):
    """LU of ``diag * I - scale * J`` for ``J`` of shape ``(n, n)`` or blocks ``(B, m, m)``;
    a singular matrix gives non-finite solutions (and so a rejected step), not an error."""
    eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
    lu, piv, _ = torch.linalg.lu_factor_ex(eye * diag - J * scale)
    return lu, piv


def lu_apply(lu, r: torch.Tensor) -> torch.Tensor:
    """Solve with :func:`lu_of`'s factors for the flat right-hand side ``r`` (shape ``(n,)``)."""
    if lu[0].ndim == 3:
        B, m = lu[0].shape[0], lu[0].shape[1]
        return torch.linalg.lu_solve(lu[0], lu[1], r.reshape(B, m, 1)).reshape(-1)
    return torch.linalg.lu_solve(lu[0], lu[1], r[:, None])[:, 0]


def check_jacobian_option(opts: dict, method: str) -> None:
    """Raise :class:`InputError` unless ``jacobian``/``jac``/``autonomous`` are usable."""
    kind = opts.get("jacobian", "autograd")
    if not callable(kind) and kind not in ("autograd", "fd"):
        raise InputError(f"options['jacobian'] must be 'autograd', 'fd' or a callable "
                         f"jac(t, y) -> (n, n) tensor, got {kind!r} (method {method!r})")
    jac = opts.get("jac")
    if jac is not None and not callable(jac):
        raise InputError(f"options['jac'] must be a callable jac(t, y) -> (n, n) tensor (df/dy "
                         f"of the flat state), got {type(jac).__name__} (method {method!r})")
    nb = opts.get("jac_blocks")
    if nb is not None and (not isinstance(nb, int) or isinstance(nb, bool) or nb < 1):
        raise InputError(f"options['jac_blocks'] must be a positive int (the number of "
                         f"independent equal-size systems in the state), got {nb!r}")
    auto = opts.get("autonomous", False)
    if not isinstance(auto, bool):
        raise InputError(f"options['autonomous'] must be True or False, got {auto!r} (method "
                         f"{method!r})")


class Derivatives:
    """``(f0, J, ft)`` at a point; ``nfe`` is counted by ``fct`` (the loop's counting wrapper)."""

    def __init__(self, fct: Callable, opts: dict, tdtype: torch.dtype, device, method: str,
                 need_ft: bool = True, jac_graph: bool = True):
        check_jacobian_option(opts, method)
        kind = opts.get("jacobian", "autograd")
        self.user = opts.get("jac") or (kind if callable(kind) else None)
        self.kind = "user" if self.user is not None else kind
        self.fct, self.tdtype, self.device = fct, tdtype, device
        self.autonomous = bool(opts.get("autonomous", False)) or not need_ft
        self.jac_evals = 0
        self.blocks = opts.get("jac_blocks")
        self.jac_graph = jac_graph  # False: J detached even under autograd (f0 keeps its graph)

    def _tt(self, t: float) -> torch.Tensor:
        return torch.scalar_tensor(t, dtype=self.tdtype, device=self.device)

    def __call__(self, t: float, y: torch.Tensor, f0: torch.Tensor | None = None):
        self.jac_evals += 1
        nb = self.blocks
        if nb is not None and y.numel() % nb:
            raise InputError(f"options['jac_blocks']={nb} does not divide the state's size "
                             f"{y.numel()}")
        if self.kind == "autograd":
            out = self._autograd(t, y)
            if out is not None:
                return out
            # f detached its input: fall back to differences (f0 from that call is kept)
            f0 = self._last_f
        if f0 is None:
            f0 = self.fct(self._tt(t), y)
        n = y.numel()
        if self.kind == "user":
            J = self.user(self._tt(t), y)
            want = (n, n) if nb is None else (nb, n // nb, n // nb)
            if not isinstance(J, torch.Tensor) or tuple(J.shape) != want:
                shape = tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__
                raise InputError(f"options['jac'] must return a {want} tensor (df/dy of "
                                 f"the flat state); got {shape} at t={t:.6g}. (An adjoint with a "
                                 "stiff adjoint_method does not reuse the forward jac: pass "
                                 "adjoint_options={'jac': None} or a jac of the augmented "
                                 "system)")
            J = J.to(device=y.device, dtype=y.dtype)
        else:
            J = self.fd(t, y, f0)
        ft = None
        if not self.autonomous:
            dt = math.sqrt(torch.finfo(y.dtype).eps) * max(abs(t), 1.0)
            ft = (self.fct(self._tt(t + dt), y) - f0) / dt
        return f0, J, ft

    def _jacrev(self, t: float, y: torch.Tensor):
        """``(f, J, df/dt)`` by ``torch.func.jacrev``, differentiable w.r.t. ``y`` and the
        parameters of ``f``.  Its inner backward runs on its own tape: differentiating on the
        solve's tape instead (``autograd.grad(f(t, y), y)`` with ``y`` the end of every earlier
        step's graph) walks that whole history once per step, quadratic in the step count."""
        tt = self._tt(t)

        def fn(tq, yq):
            out = self.fct(tq, yq)
            return out, out

        argnums = (1,) if self.autonomous else (1, 0)
        jac, fy = torch.func.jacrev(fn, argnums=argnums, has_aux=True)(tt, y)
        J = jac[0]
        ft = None if self.autonomous else jac[1].reshape(-1).to(y.dtype)
        return fy, J, ft

    def fd(self, t: float, y: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        """Forward-difference ``df/dy`` (``n`` evaluations, or ``m`` for blocks), detached."""
        with torch.no_grad():
            yd, f0d = y.detach(), f0.detach()
            sq = math.sqrt(torch.finfo(y.dtype).eps)
            dy = sq * torch.clamp(yd.abs(), min=1e-3)
            tt = self._tt(t)
            nb = self.blocks or 1
            m = yd.numel() // nb
            cols = []
            for j in range(m):
                yj = yd.clone().reshape(nb, m)
                yj[:, j] += dy.reshape(nb, m)[:, j]
                step = (yj[:, j] - yd.reshape(nb, m)[:, j])[:, None]
                cols.append((self.fct(tt, yj.reshape(-1)) - f0d).reshape(nb, m) / step)
            J = torch.stack(cols, 2)  # (nb, m rows, m columns)
            return J if self.blocks else J[0]

    def _autograd(self, t: float, y: torch.Tensor):
        graph = torch.is_grad_enabled()
        if graph and self.jac_graph and y.requires_grad and not self.blocks \
                and not getattr(self, "_no_func", False):
            try:
                return self._jacrev(t, y)
            except Exception:  # noqa: BLE001 - f not transformable by torch.func: the tape
                self._no_func = True
        n = y.numel()
        with torch.enable_grad():
            yy = y if (graph and y.requires_grad) else y.detach().requires_grad_(True)
            tt = self._tt(t)
            if not self.autonomous:
                tt.requires_grad_(True)
            fy = self.fct(tt, yy)
            inputs = (yy,) if (self.autonomous or self.blocks) else (yy, tt)
            if not fy.requires_grad:
                # no graph back to y or t: f detaches its arguments (or ignores them)
                self._last_f = fy
                return None
            nb = self.blocks or 1
            eye = torch.eye(n // nb, dtype=fy.dtype, device=fy.device).repeat(1, nb)
            gs = batched_vjp(fy, inputs, eye, retain_graph=True,
                             create_graph=graph and self.jac_graph)
        J = gs[0] if gs[0] is not None else torch.zeros(eye.shape, dtype=y.dtype,
                                                         device=y.device)
        ft = None
        if self.blocks:  # row i of gs: d f_{b,i} / d y_{b,j} at column b*m + j
            m = n // nb
            J = J.reshape(m, nb, m).permute(1, 0, 2)
            if not self.autonomous:
                with torch.no_grad():
                    dt = math.sqrt(torch.finfo(y.dtype).eps) * max(abs(t), 1.0)
                    ft = (self.fct(self._tt(t + dt), y.detach()) - fy.detach()) / dt
        elif not self.autonomous and gs[1] is not None:
            ft = gs[1].reshape(n).to(y.dtype)
        if not graph or not self.jac_graph:
            J = J.detach()
        if not graph:
            fy = fy.detach()
            ft = None if ft is None else ft.detach()
        return fy, J, ft
