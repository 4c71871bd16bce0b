"""The tournament's outputs: per method and setting, means with 95 % intervals over seeds
(stats.mean_ci), the reward gain paired against the baseline's on the same seeds, the consistency
checks' verdict, a markdown table and the PNG."""

from __future__ import annotations

from pathlib import Path

from examples.toy_rl.methods import Method
from examples.toy_rl.stats import mean_ci, paired_ci

BASELINE = "GRPO"  # the paired comparison's reference (the first method when GRPO is not run)
WITH_CI = (
    "reward_gain", "reward_end", "fully_clipped", "utilisation", "token_utilisation",
    "clip_frac_low", "clip_frac_high", "clip_frac", "approx_kl",
)  # fmt: skip
SIGNED = ("reward_gain", "approx_kl")  # the others are shares in [0, 1], whose intervals are cut to it
# What the checks must show: the loss's metrics against the loop's float64 recomputation.
TOLERANCE = {"clip_frac": 1e-6, "approx_kl": 1e-6, "ratio_range": 1e-5, "vespo_phi_mean": 1e-5, "logprob": 1e-4}
TIE_MARGIN = 1e-6  # a difference in what is clipped is a rounding tie when its quantity lies this near a bound


def checks_failed(c: dict) -> list[str]:
    """The checks of one run (train.summarise_run's `checks`) that failed; [] when all agreed."""
    bad = [f"{k} {c[f'max_abs_diff_{k}']:.1e}" for k in ("clip_frac_low", "clip_frac_high", "clip_frac")
           if c[f"max_abs_diff_{k}"] > TOLERANCE["clip_frac"]]  # fmt: skip
    if c["max_abs_diff_approx_kl"] > TOLERANCE["approx_kl"]:
        bad.append(f"approx_kl {c['max_abs_diff_approx_kl']:.1e}")
    if c["max_abs_diff_vespo_phi_mean"] > TOLERANCE["vespo_phi_mean"]:
        bad.append(f"vespo_phi_mean {c['max_abs_diff_vespo_phi_mean']:.1e}")
    if c["max_rel_diff_ratio_range"] > TOLERANCE["ratio_range"]:
        bad.append(f"ratio range {c['max_rel_diff_ratio_range']:.1e}")
    if c.get("clipped_vs_zero_grad_tokens", 0):
        bad.append(f"{c['clipped_vs_zero_grad_tokens']} clipped token(s) with a gradient or unclipped without")
    if c["updates_with_a_difference"] and c["max_bound_margin_where_counts_differ"] >= TIE_MARGIN:
        bad.append(
            f"{c['updates_with_a_difference']} update(s) where the loss and the loop disagree on clipped or "
            f"zero-gradient tokens away from a bound (margin {c['max_bound_margin_where_counts_differ']:.1e})"
        )
    if c["max_old_logprob_gap"] > TOLERANCE["logprob"]:
        bad.append(f"old log-probs {c['max_old_logprob_gap']:.1e} from the sampler's")
    return bad


def _setting_entry(runs: list[dict], baseline: list[dict] | None, base: str) -> dict:
    for r in runs:
        r["reward_gain"] = r["reward_end"] - r["reward_start"]
    entry = {k: mean_ci([r[k] for r in runs], None if k in SIGNED else (0.0, 1.0)) for k in WITH_CI}
    if baseline is not None:
        entry[f"reward_gain_vs_{base}"] = paired_ci(
            [r["reward_gain"] for r in runs], [b["reward_end"] - b["reward_start"] for b in baseline]
        )
    entry["reward_start"] = sum(r["reward_start"] for r in runs) / len(runs)
    entry["ratio_min"] = min(r["ratio_min"] for r in runs)
    entry["ratio_max"] = max(r["ratio_max"] for r in runs)
    entry["seconds"] = sum(r["seconds"] for r in runs)
    entry["checks"] = {k: max(r["checks"][k] for r in runs) for k in runs[0]["checks"]}
    entry["checks_failed"] = {r["seed"]: f for r in runs if (f := checks_failed(r["checks"]))}
    entry["seeds"] = runs
    return entry


def aggregate(config: dict, methods: list[Method], setting_names: list[str], runs: dict) -> dict:
    """{"config", "baseline", "methods": {name: {granularity, objective, ..., "settings": {setting: entry}}}}."""
    names = [m.name for m in methods]
    base = BASELINE if BASELINE in names else names[0]
    out = {}
    for m in methods:
        per_setting = {}
        for s in setting_names:
            baseline = runs[(base, s)] if m.name != base else None
            per_setting[s] = _setting_entry(runs[(m.name, s)], baseline, base)
        out[m.name] = {**m.settings(), "settings": per_setting}
    return {"config": {**config, "baseline": base}, "methods": out}


def _ci(x: dict, scale: float = 1.0, digits: int = 3) -> str:
    lo, hi = (v * scale for v in x["ci95"])
    return f"{x['mean'] * scale:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_markdown(payload: dict) -> str:
    """One row per method and setting: reward gain with its interval, paired difference to the baseline
    (* where its interval excludes 0), fully clipped, utilisation, token clip fractions, ratio range, KL."""
    base = payload["config"]["baseline"]
    head = (
        f"| method | setting | reward gain [95 % CI] | gain - {base} [95 % CI] | fully clipped % [95 % CI] | "
        "utilisation: responses / tokens | token clip low / high | ratio range | approx KL | checks |"
    )
    lines = [head, "|" + "---|" * 10]
    for name, m in payload["methods"].items():
        for setting, e in m["settings"].items():
            diff = e.get(f"reward_gain_vs_{base}")
            diff_text = "-" if diff is None else _ci(diff, digits=3) + (" *" if diff["significant"] else "")
            checks = "ok" if not e["checks_failed"] else f"FAILED ({len(e['checks_failed'])} seeds)"
            lines.append(
                f"| {name} | {setting} | {_ci(e['reward_gain'])} | {diff_text} | "
                f"{_ci(e['fully_clipped'], 100, 1)} | {100 * e['utilisation']['mean']:.1f} % / "
                f"{100 * e['token_utilisation']['mean']:.1f} % | {e['clip_frac_low']['mean']:.3f} / "
                f"{e['clip_frac_high']['mean']:.3f} | {e['ratio_min']:.3g} .. {e['ratio_max']:.3g} | "
                f"{e['approx_kl']['mean']:.4f} | {checks} |"
            )
    cfg = payload["config"]
    lines.append("")
    first = next(iter(cfg["settings"].values()))
    lines.append(
        f"{len(cfg['seeds'])} seeds, {first['iterations']} iterations a run; intervals: "
        f"{cfg['interval']}; * : the paired interval excludes 0 (no correction for the "
        f"{max(len(payload['methods']) - 1, 0) * len(cfg['settings'])} comparisons)."
    )
    return "\n".join(lines)


def format_short(payload: dict) -> str:
    """The README's table: one row per method, both settings side by side (gain, paired difference to the
    baseline, fully clipped %)."""
    base = payload["config"]["baseline"]
    names = list(payload["config"]["settings"])
    head = "| method | " + " | ".join(f"{s}: gain [95 % CI] | {s}: gain - {base} | {s}: fully clipped %" for s in names)
    lines = [head + " |", "|---|" + "---|" * (3 * len(names))]
    for name, m in payload["methods"].items():
        cells = []
        for s in names:
            e = m["settings"][s]
            diff = e.get(f"reward_gain_vs_{base}")
            cells += [
                _ci(e["reward_gain"]),
                "-" if diff is None else _ci(diff) + (" *" if diff["significant"] else ""),
                f"{100 * e['fully_clipped']['mean']:.1f}",
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_checks_summary(payload: dict) -> str:
    """One line: whether every run's checks agreed with the loop's float64 recomputation, and the worst gaps."""
    failed, worst = [], {"frac": 0.0, "kl": 0.0, "ratio": 0.0, "ties": 0, "negligible": 0}
    runs = 0
    for name, m in payload["methods"].items():
        for setting, e in m["settings"].items():
            runs += len(e["seeds"])
            failed += [f"{name} {setting} seed {seed}: {'; '.join(f)}" for seed, f in e["checks_failed"].items()]
            c = e["checks"]
            worst["frac"] = max(worst["frac"], c["max_abs_diff_clip_frac"])
            worst["kl"] = max(worst["kl"], c["max_abs_diff_approx_kl"])
            worst["ratio"] = max(worst["ratio"], c["max_rel_diff_ratio_range"])
            worst["ties"] += sum(r["checks"]["updates_with_a_difference"] for r in e["seeds"])
            worst["negligible"] += sum(r["checks"]["negligible_grad_tokens"] for r in e["seeds"])
    head = (
        f"checks: {runs - len(failed)} of {runs} runs agree with the loop's float64 recomputation (clip fractions "
        f"within {worst['frac']:.1e}, KL within {worst['kl']:.1e}, ratio range within {worst['ratio']:.1e} relative; "
        f"zero gradients as predicted; {worst['ties']} update(s) with a rounding tie at a bound, "
        f"{worst['negligible']} token(s) with a float64 gradient below 1e-6 |A| max(rho, 1), counted as the loss "
        "gave them)"
    )
    return "\n".join([head, *failed])


def plot_tournament(path: Path, payload: dict) -> None:
    """Two panels, one row per method: reward gain (mean and 95 % interval, seeds as dots) and the share
    of responses with A != 0 fully clipped, for each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(payload["methods"])
    settings = list(payload["config"]["settings"])
    colours = dict(zip(settings, ("tab:blue", "tab:orange")))
    offsets = dict(zip(settings, (-0.17, 0.17) if len(settings) > 1 else (0.0,)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(methods) + 1.8), sharey=True)
    for panel, (key, scale) in enumerate((("reward_gain", 1.0), ("fully_clipped", 100.0))):
        ax = axes[panel]
        for s in settings:
            for row, name in enumerate(methods):
                e = payload["methods"][name]["settings"][s][key]
                y = row + offsets[s]
                lo, hi = (v * scale for v in e["ci95"])
                ax.errorbar(e["mean"] * scale, y, xerr=[[e["mean"] * scale - lo], [hi - e["mean"] * scale]],
                            fmt="o", color=colours[s], capsize=3, label=s if row == 0 else None)  # fmt: skip
                dots = [r[key] * scale for r in payload["methods"][name]["settings"][s]["seeds"]]
                ax.plot(dots, [y] * len(dots), "|", color=colours[s], alpha=0.5, markersize=7)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8, loc="lower right")
    cfg = payload["config"]
    axes[0].set_title("reward gain on the evaluation prompts (mean, 95 % t interval, seeds)", fontsize=10)
    axes[1].set_title("% of responses with A != 0 fully clipped (zero gradient)", fontsize=10)
    labels = [n if (g := payload["methods"][n]["granularity"]) in n else f"{n} ({g})" for n in methods]
    axes[0].set_yticks(range(len(methods)), labels)
    axes[0].axvline(0.0, color="grey", linewidth=0.8)
    axes[0].set_xlabel("reward after RL - reward of the warmed-up policy")
    axes[1].set_xlabel("% of responses")
    axes[0].invert_yaxis()
    described = ", ".join(f"{k} = {rl['minibatches']} mini-batches per epoch" for k, rl in cfg["settings"].items())
    first = next(iter(cfg["settings"].values()))
    fig.suptitle(f"{len(cfg['seeds'])} seeds x {first['iterations']} iterations; {described}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
