"""The one comparison helper of the test suite: it names the tensor and shows the worst element."""

from __future__ import annotations

import torch


def assert_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, NaN matching NaN.

    Both are compared in float64 on the CPU. On failure the message names the tensor, the number of
    bad elements, the worst index and both values there.
    """
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = torch.nonzero(nan_a != nan_e)[0].tolist()
        raise AssertionError(f"{name}: NaN mismatch at {idx}: actual {a[tuple(idx)]}, expected {e[tuple(idx)]}")
    a, e = a.masked_fill(nan_a, 0.0), e.masked_fill(nan_e, 0.0)
    inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & (a != e)
    err = (a - e).abs().masked_fill(torch.isinf(a) & (a == e), 0.0)
    bound = atol + rtol * e.abs()
    bad = (err > bound) | inf_mismatch
    if bad.any():
        excess = torch.where(bad, (err - bound).nan_to_num(posinf=float("inf")), torch.zeros_like(err))
        flat = int(torch.argmax(excess.reshape(-1)))
        idx = tuple(torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        idx = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off (atol={atol:g}, rtol={rtol:g}); "
            f"worst at {list(idx)}: actual {a[idx].item():.9g}, expected {e[idx].item():.9g}, "
            f"abs err {err[idx].item():.3g}; max abs err {err.max().item():.3g}"
        )


def assert_rel_norm(name: str, actual: torch.Tensor, expected: torch.Tensor, *, tol: float) -> None:
    """Assert ||actual - expected|| / ||expected|| <= tol (the contract's gradient criterion).

    When the expected tensor is all zero, the actual one must be all zero too.
    """
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    ref = e.norm()
    diff = (a - e).norm()
    if ref == 0:
        assert diff == 0, f"{name}: expected all zero, got norm {diff.item():.3g}"
        return
    rel = (diff / ref).item()
    if rel > tol:
        flat = int(torch.argmax((a - e).abs().reshape(-1)))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        raise AssertionError(
            f"{name}: relative error {rel:.3g} > {tol:g}; worst at {list(idx)}: "
            f"actual {a[idx].item():.9g}, expected {e[idx].item():.9g}"
        )


def ulps(actual: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|actual - round(exact)| in units in the last place of round(exact), in actual's dtype."""
    fi = torch.finfo(actual.dtype)
    rounded = exact.to(actual.dtype).double()
    _, exp = torch.frexp(rounded)
    ulp = torch.ldexp(torch.full_like(rounded, fi.eps / 2), exp)  # |x| in [2^(exp-1), 2^exp)
    ulp = torch.where(rounded.abs() < fi.smallest_normal, fi.smallest_normal * fi.eps, ulp)
    return (actual.double() - rounded).abs() / ulp
