"""The demo's outputs: the summary over seeds, the table, the JSON file and the PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path

# Per-method keys of the JSON file (besides "curves", "seeds", "checks" and the method's settings).
SUMMARY_KEYS = (
    "reward_start",
    "reward_end",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "fully_clipped",
    "utilisation",
    "token_utilisation",
    "ratio_min",
    "ratio_max",
    "approx_kl",
    "seconds",
)
CURVE_KEYS = (
    "reward",
    "clip_frac_low",
    "clip_frac_high",
    "clip_frac",
    "fully_clipped",
    "approx_kl",
    "ratio_min",
    "ratio_max",
)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def combine_seeds(per_seed: list[dict]) -> dict:
    """One method's runs over seeds -> means (ratio_min / max: the extremes, seconds: the sum),
    curves averaged point by point, and the worst check over seeds."""
    out = {}
    for key in SUMMARY_KEYS:
        values = [run[key] for run in per_seed]
        out[key] = min(values) if key == "ratio_min" else max(values) if key == "ratio_max" else _mean(values)
    out["seconds"] = sum(run["seconds"] for run in per_seed)
    out["curves"] = {
        k: [_mean(list(points)) for points in zip(*(run["curves"][k] for run in per_seed))] for k in CURVE_KEYS
    }
    out["checks"] = {k: max(run["checks"][k] for run in per_seed) for k in per_seed[0]["checks"]}
    return out


def format_table(methods: dict[str, dict], seeds: int) -> str:
    """One row per method; reward start / end on the fixed evaluation prompts."""
    head = (
        f"{'method':<6} {'granularity':<12} {'reward start':>12} {'reward end':>10} {'clip low':>8} "
        f"{'clip high':>9} {'fully clipped':>13} {'ratio range':>15} {'approx KL':>10} {'seconds':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, m in methods.items():
        ratio = f"{m['ratio_min']:.3g}..{m['ratio_max']:.3g}"
        lines.append(
            f"{name:<6} {m['granularity']:<12} {m['reward_start']:>12.3f} {m['reward_end']:>10.3f} "
            f"{m['clip_frac_low']:>8.3f} {m['clip_frac_high']:>9.3f} {m['fully_clipped']:>12.1%} "
            f"{ratio:>15} {m['approx_kl']:>10.4f} {m['seconds']:>8.1f}"
        )
    lines.append(
        f"({seeds} seed{'s' if seeds > 1 else ''}; clip low/high: share of tokens clipped, mean over updates; "
        "fully clipped: responses with A != 0 whose every token got exactly zero gradient; ratio range: "
        "per-segment ratios over all updates)"
    )
    return "\n".join(lines)


def format_checks(methods: dict[str, dict]) -> str:
    """The loss's metrics against the loop's own measurements, one line per method."""
    lines = []
    for name, m in methods.items():
        c = m["checks"]
        worst_frac = max(c[f"max_abs_diff_{k}"] for k in ("clip_frac_low", "clip_frac_high", "clip_frac"))
        clipped = c.get("clipped_vs_zero_grad_tokens")
        lines.append(
            f"check {name}: clip fractions within {worst_frac:.1e}, KL within {c['max_abs_diff_approx_kl']:.1e}, "
            f"ratio range within {c['max_rel_diff_ratio_range']:.1e} (relative) of the loop's recomputation; "
            + ("" if clipped is None else f"{clipped} token(s) where clipped != zero gradient, ")
            + f"{c['zero_grad_vs_predicted_tokens']} token(s) where zero gradient != predicted, "
            f"{c['fully_clipped_vs_predicted']} response(s) where fully clipped != predicted"
        )
        if c["negligible_grad_tokens"]:
            lines.append(
                f"      {c['negligible_grad_tokens']} token(s) whose float64 gradient lay below 1e-6 |A| max(rho, 1), "
                "where the fp32 loss may give exactly 0: counted as the loss gave them"
            )
        if c["updates_with_a_difference"]:
            lines.append(
                f"      {c['updates_with_a_difference']} update(s) with a token counted differently by the loss and "
                f"the loop: the nearest clipped quantity lay within {c['max_bound_margin_where_counts_differ']:.1e} "
                "(relative) of its bound, where fp32 (the loss) and float64 (the loop) may round differently"
            )
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def plot_curves(path: Path, methods: dict[str, dict], title: str) -> None:
    """2 x 2 panels over RL iterations: rollout reward, token clip fractions (low dashed, high solid),
    share of fully clipped responses, approximate KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    colours = dict(zip(methods, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")))
    for name, m in methods.items():
        curves, colour = m["curves"], colours[name]
        x = range(1, len(curves["reward"]) + 1)
        label = f"{name} ({m['granularity']})"
        axes[0, 0].plot(x, curves["reward"], color=colour, label=label)
        axes[0, 1].plot(x, curves["clip_frac_high"], color=colour, label=f"{name} high (A > 0)")
        axes[0, 1].plot(x, curves["clip_frac_low"], color=colour, linestyle="--", label=f"{name} low (A < 0)")
        axes[1, 0].plot(x, [100 * v for v in curves["fully_clipped"]], color=colour, label=label)
        axes[1, 1].plot(x, curves["approx_kl"], color=colour, label=label)
    panels = (
        (axes[0, 0], "mean reward of the rollouts"),
        (axes[0, 1], "share of tokens clipped"),
        (axes[1, 0], "% of responses (A != 0) fully clipped: zero gradient"),
        (axes[1, 1], "approximate KL to the rollout policy"),
    )
    for ax, label in panels:
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("RL iteration")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
