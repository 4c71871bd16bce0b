"""Means with 95 % intervals over seeds: Student's t (the seeds are few, 5 by default, where a bootstrap
interval is too narrow), for one method's values and for paired differences between two methods that
share each seed's warm-up, first rollout and evaluation prompts."""

from __future__ import annotations

import math

# Two-sided 95 % quantiles t_{0.975, df} of Student's t for df = 1..30 (standard tables, 4 decimals).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}; beyond the table, the Cornish-Fisher expansion in 1/df (error < 1e-3 for df > 30)."""
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list[float], bounds: tuple[float, float] | None = None) -> dict:
    """{"mean", "ci95": [lo, hi], "sd", "n"}: the mean with mean +- t_{0.975, n-1} * sd / sqrt(n) (sd with
    n - 1); with one value the interval is [mean, mean] and sd is 0. `bounds`: the range of a share, e.g.
    (0, 1), to which the interval is cut."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "ci95": [mean, mean], "sd": 0.0, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "ci95": [lo, hi], "sd": sd, "n": n}


def paired_ci(values: list[float], baseline: list[float]) -> dict:
    """mean_ci of the per-seed differences values[i] - baseline[i], plus "significant": whether the
    interval excludes 0."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values need the same seeds: {len(values)} != {len(baseline)}")
    out = mean_ci([v - b for v, b in zip(values, baseline)])
    out["significant"] = out["ci95"][0] > 0 or out["ci95"][1] < 0
    return out
