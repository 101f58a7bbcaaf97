"""The fixed-grid loop as torchdiffeq's FixedGridODESolver: time gradients through the grid
(closed forms of the schemes), callback_step only (forward and adjoint backward), the perturb
protocol at grid points, one output time, and the implicit methods wired in (closed-form
stability functions)."""

import math

import pytest
import torch

from pydiffbridge import odeint, odeint_adjoint, solve
from pydiffbridge.errors import InputError, UnknownOptionError
from pydiffbridge.solvers.hooks import Perturb

D = torch.float64
A = -0.7  # y' = A y

EXPLICIT = ["euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams"]
IMPLICIT = ["implicit_euler", "implicit_midpoint", "trapezoid", "radauIIA3", "radauIIA5", "gl4",
            "gl6", "sdirk2", "trbdf2"]


# ------------------------------------------------------------------ time gradients (task 5)
def test_euler_time_gradients_closed_form_step_size():
    # grid t0 + k h (k < n) closed by t1: y(t1) = y0 (1 + A h)^(n-1) (1 + A (t1 - t0 - (n-1) h))
    h, y0 = 0.1, 1.3
    t = torch.tensor([0.1, 1.05], dtype=D, requires_grad=True)
    y1 = odeint(lambda s, y: A * y, torch.tensor([y0], dtype=D), t, method="euler",
                options={"step_size": h})[-1, 0]
    n = math.ceil((1.05 - 0.1) / h - 1e-9)
    last = 1.05 - 0.1 - (n - 1) * h
    assert abs(float(y1.detach()) - y0 * (1 + A * h) ** (n - 1) * (1 + A * last)) < 1e-14
    d0, d1 = torch.autograd.grad(y1, t)[0].tolist()
    dy_dlast = y0 * (1 + A * h) ** (n - 1) * A
    assert abs(d1 - dy_dlast) < 1e-13  # moving t1 lengthens the last step only
    assert abs(d0 + dy_dlast) < 1e-13  # moving t0 shifts the grid: the last step shortens


def test_euler_time_gradients_closed_form_grid_is_t():
    # the grid is t: y_j = y0 prod_{i<j} (1 + A (t_{i+1} - t_i)); reference: autograd of that
    tv = [0.0, 0.3, 0.45, 1.0, 1.2]
    t = torch.tensor(tv, dtype=D, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5], dtype=D)
    ys = odeint(lambda s, y: A * y, torch.ones(1, dtype=D), t, method="euler")[:, 0]
    (g,) = torch.autograd.grad((w * ys).sum(), t)
    tr = torch.tensor(tv, dtype=D, requires_grad=True)
    closed = torch.cat([torch.ones(1, dtype=D), torch.cumprod(1 + A * (tr[1:] - tr[:-1]), 0)])
    (g_ref,) = torch.autograd.grad((w * closed).sum(), tr)
    torch.testing.assert_close(ys, closed.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-13)


def _rk4_factor(z):
    return 1 + z + z * z / 2 + z ** 3 / 6 + z ** 4 / 24


def test_rk4_time_gradient_closed_form_and_interior_output():
    # y(t_out) for t_out inside a step is the linear interpolant of the grid values:
    # y = y_k + s (y_{k+1} - y_k), s = (t_out - t_k)/h, so dy/dt_out = (y_{k+1} - y_k)/h
    h = 0.1
    t = torch.tensor([0.0, 0.43, 1.0], dtype=D, requires_grad=True)
    ys = odeint(lambda s, y: A * y, torch.ones(1, dtype=D), t, method="rk4",
                options={"step_size": h})
    R = _rk4_factor(A * h)
    yk, yk1 = R ** 4, R ** 5
    assert abs(float(ys[1, 0].detach()) - (yk + 0.3 * (yk1 - yk))) < 1e-14
    (g,) = torch.autograd.grad(ys[1, 0], t)
    # t0 moves the grid (and with it the output's fraction): d/dt0 = -dy/dt_out for autonomous
    assert abs(float(g[1]) - (yk1 - yk) / h) < 1e-12
    assert abs(float(g[0]) + (yk1 - yk) / h) < 1e-12
    assert float(g[2]) == 0.0


@pytest.mark.parametrize("method", EXPLICIT + IMPLICIT)
def test_time_gradients_match_finite_differences(method):
    def f(s, y):
        return -y * torch.cos(s) + torch.sin(3 * s)

    opts = {"step_size": 0.05}
    if method in IMPLICIT:
        opts["newton_tol"] = 1e-9
    t = torch.tensor([0.2, 0.71, 1.33], dtype=D, requires_grad=True)  # no step ends on t[-1]
    assert torch.autograd.gradcheck(
        lambda tt: odeint(f, torch.tensor([0.8, -0.3], dtype=D), tt, method=method, rtol=1e-10,
                          atol=1e-12, options=opts), (t,), atol=1e-6)


def test_adams_time_gradients_on_a_nonuniform_grid():
    # the Adams coefficients depend on the grid: they are differentiated too
    def grid(func, y0, t):
        s = torch.linspace(0, 1, 12, dtype=D) ** 1.5
        return t[0] + (t[-1] - t[0]) * s

    t = torch.tensor([0.0, 1.5], dtype=D, requires_grad=True)
    for m in ("explicit_adams", "implicit_adams"):
        assert torch.autograd.gradcheck(
            lambda tt, m=m: odeint(lambda s, y: -y * (1 + s), torch.ones(2, dtype=D), tt,
                                   method=m, options={"grid_constructor": grid}), (t,))


# ------------------------------------------------------------------------------ callbacks
class Logged(torch.nn.Module):
    def __init__(self, accept=False):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(0.5, dtype=D))
        self.log = {"step": [], "step_adjoint": []}
        if accept:
            self.callback_accept_step = lambda t0, y0, dt: self.log.setdefault("accept", [])

    def forward(self, t, y):
        return -self.k * y

    def callback_step(self, t0, y0, dt):
        assert t0.ndim == 0 and dt.ndim == 0 and y0.shape == (2,)
        self.log["step"].append((float(t0), float(dt)))

    def callback_step_adjoint(self, t0, y0, dt):
        self.log["step_adjoint"].append((float(t0), float(dt)))


@pytest.mark.parametrize("decreasing", [False, True])
def test_callback_step_before_every_step(decreasing):
    f = Logged()
    t = torch.tensor([0.0, 1.0] if not decreasing else [1.0, 0.0], dtype=D)
    sol = solve(f, torch.ones(2, dtype=D), t, method="rk4", options={"step_size": 0.25})
    grid = [0.0, 0.25, 0.5, 0.75] if not decreasing else [1.0, 0.75, 0.5, 0.25]
    assert sol.stats.steps == 4
    # torchdiffeq: the grid time the step starts from, and dt > 0 (it integrates -t upwards)
    assert f.log["step"] == [(g, 0.25) for g in grid]


def test_accept_callback_is_not_supported_on_a_fixed_grid():
    f = Logged(accept=True)
    with pytest.warns(UserWarning, match="does not support callbacks"):
        odeint(f, torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D), method="euler",
               options={"step_size": 0.5})
    assert "accept" not in f.log and len(f.log["step"]) == 2


def test_adjoint_backward_calls_callback_step_adjoint():
    f = Logged()
    sol = solve(f, torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D), method="midpoint",
                options={"step_size": 0.1}, gradient="adjoint")
    assert len(f.log["step"]) == 10 and not f.log["step_adjoint"]
    sol.ys[-1].sum().backward()
    assert len(f.log["step_adjoint"]) == sol.stats.steps_backward == 10
    assert len(f.log["step"]) == 10  # the forward callback is not called by the backward pass
    starts = [t0 for t0, _ in f.log["step_adjoint"]]
    assert abs(starts[0] - 1.0) < 1e-15 and abs(starts[-1] - 0.1) < 1e-12
    assert float(f.k.grad) == pytest.approx(-2 * math.exp(-0.5), rel=1e-3)  # midpoint: O(h^2)


# -------------------------------------------------------------------------------- perturb
def _jump(flags):
    def f(t, y, perturb=Perturb.NONE):
        flags.append((t, perturb))
        return -y if t < 0.5 else 2 * y

    return f


def test_perturb_flags_at_the_grid_points():
    flags = []
    h = 0.1
    ys = odeint(_jump(flags), torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                method="rk4", options={"step_size": h, "perturb": True})
    # every step sees the left side of its own interval: exact products of stability factors
    exact = _rk4_factor(-h) ** 5 * _rk4_factor(2 * h) ** 5
    assert abs(float(ys[-1, 0]) - exact) < 1e-13
    nxt = [float(t) for t, p in flags if p is Perturb.NEXT]
    prev = [float(t) for t, p in flags if p is Perturb.PREV]
    assert len(nxt) == len(prev) == 10
    grid = [0.0] + [k * h for k in range(1, 10)] + [1.0]
    for k in range(10):
        assert nxt[k] == math.nextafter(grid[k], math.inf)
        assert prev[k] == math.nextafter(grid[k + 1], -math.inf)
    # without perturb the last stage of the step ending at 0.5 sees the right-hand value
    plain = odeint(_jump([]), torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                   method="rk4", options={"step_size": h})
    assert abs(float(plain[-1, 0]) - exact) > 1e-6


def test_perturb_survives_a_float32_state():
    flags = []
    y0 = torch.ones(1, dtype=torch.float32)
    odeint(_jump(flags), y0, torch.tensor([0.0, 1.0], dtype=D), method="euler",
           options={"step_size": 0.5, "perturb": True})
    assert all(t.dtype == torch.float32 for t, _ in flags)
    (t_half,) = [t for t, p in flags if p is Perturb.NEXT and float(t) > 0.25]
    assert float(t_half) > 0.5 and float(t_half) == float(
        torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))


def test_perturb_for_funcs_without_the_keyword_and_implicit_methods():
    seen = []

    def f(t, y):
        seen.append(float(t))
        return -y if t < 0.5 else 2 * y

    h = 0.25
    ys = odeint(f, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                method="implicit_euler", options={"step_size": h, "perturb": True})
    # backward Euler evaluates at the step end: just before 0.5 it still sees -y
    assert abs(float(ys[-1, 0]) - (1 / (1 + h)) ** 2 * (1 / (1 - 2 * h)) ** 2) < 1e-9
    assert 0.5 not in seen and math.nextafter(0.5, 0.0) in seen


# ------------------------------------------------------------------------ one output time
@pytest.mark.parametrize("method", ["euler", "rk4", "implicit_adams", "gl4"])
@pytest.mark.parametrize("opts", [None, {"step_size": 0.1}])
def test_single_output_time(method, opts):
    y0 = torch.tensor([1.0, 2.0], dtype=D)
    ys = odeint(lambda t, y: -y, y0, torch.tensor([0.3], dtype=D), method=method, options=opts)
    assert ys.shape == (1, 2) and torch.equal(ys[0], y0)


# --------------------------------------------------------------- implicit methods wired in
def _r_tableau(A_, b, z):
    """Stability function R(z) = det(I - zA + z 1 b^T) / det(I - zA) of a Butcher tableau."""
    A_ = torch.tensor(A_, dtype=D)
    b = torch.tensor(b, dtype=D)
    eye = torch.eye(len(b), dtype=D)
    return float(torch.det(eye - z * A_ + z * torch.ones(len(b), 1, dtype=D) * b[None])
                 / torch.det(eye - z * A_))


_G = 1 - 1 / math.sqrt(2)  # Alexander's SDIRK2
_GT = 2 - math.sqrt(2)     # TR-BDF2 (Hosea & Shampine)
_W = math.sqrt(2) / 4
STABILITY = {  # Padé approximants (Hairer & Wanner II, Sec. IV.3-5) and the DIRK tableaux
    "implicit_euler": lambda z: 1 / (1 - z),
    "implicit_midpoint": lambda z: (1 + z / 2) / (1 - z / 2),
    "trapezoid": lambda z: (1 + z / 2) / (1 - z / 2),
    "radauIIA3": lambda z: (1 + z / 3) / (1 - 2 * z / 3 + z * z / 6),
    "radauIIA5": lambda z: (1 + 2 * z / 5 + z * z / 20) / (1 - 3 * z / 5 + 3 * z * z / 20
                                                            - z ** 3 / 60),
    "gl4": lambda z: (1 + z / 2 + z * z / 12) / (1 - z / 2 + z * z / 12),
    "gl6": lambda z: (1 + z / 2 + z * z / 10 + z ** 3 / 120) / (1 - z / 2 + z * z / 10
                                                                 - z ** 3 / 120),
    "sdirk2": lambda z: _r_tableau([[_G, 0], [1 - _G, _G]], [1 - _G, _G], z),
    "trbdf2": lambda z: _r_tableau([[0, 0, 0], [_GT / 2, _GT / 2, 0], [_W, _W, _GT / 2]],
                                   [_W, _W, _GT / 2], z),
}


@pytest.mark.parametrize("method", IMPLICIT)
def test_implicit_methods_on_a_stiff_linear_problem(method):
    lam, h, n = -40.0, 0.05, 8
    y0 = torch.tensor([1.0, -0.5], dtype=D)
    t = torch.tensor([0.0, 0.17, n * h], dtype=D)
    ys = odeint(lambda s, y: lam * y, y0, t, method=method, options={"step_size": h})
    R = STABILITY[method](lam * h)
    torch.testing.assert_close(ys[-1], y0 * R ** n, rtol=1e-9, atol=1e-12)
    yk, yk1 = y0 * R ** 3, y0 * R ** 4  # 0.17 lies in the 4th step: linear interpolation
    torch.testing.assert_close(ys[1], yk + 0.4 * (yk1 - yk), rtol=1e-9, atol=1e-12)


def test_implicit_options_are_checked():
    f, y0, t = (lambda s, y: -y), torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    odeint(f, y0, t, method="radauIIA5", options={"step_size": 0.5, "newton_tol": 1e-6,
                                                   "jacobian": "fd", "max_iters": 7})
    with pytest.raises(UnknownOptionError, match="max_order"):
        solve(f, y0, t, method="gl4", options={"max_order": 3})
    with pytest.raises(InputError, match="newton_tol"):
        odeint(f, y0, t, method="gl4", options={"newton_tol": -1.0})
    with pytest.raises(UnknownOptionError, match="newton_tol"):
        solve(f, y0, t, method="rk4", options={"newton_tol": 1e-3})


def test_implicit_methods_backprop_and_adjoint():
    k = torch.tensor(3.0, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    for odeint_fn in (odeint, odeint_adjoint):
        kw = {"adjoint_params": (k,)} if odeint_fn is odeint_adjoint else {}
        y1 = odeint_fn(lambda s, y: -k * y, torch.ones(1, dtype=D), t, method="radauIIA5",
                       options={"step_size": 0.01}, **kw)[-1, 0]
        (dk,) = torch.autograd.grad(y1, k)
        assert abs(float(dk) + math.exp(-3.0)) < 1e-7


def test_step_size_and_grid_constructor_are_exclusive():
    with pytest.raises(InputError, match="mutually exclusive"):
        odeint(lambda s, y: -y, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
               method="euler", options={"step_size": 0.1, "grid_constructor": lambda f, y, t: t})
