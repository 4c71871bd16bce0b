"""The demo's driver: per seed, one supervised warm-up, then each method's RL run from a copy of it.

`python -m examples.toy_rl --help` lists the options; `bash ci/demo.sh` runs the defaults and
`bash ci/demo.sh --tournament` the tournament of every objective (tournament.py).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from examples.toy_rl.measure import BOUNDED
from examples.toy_rl.methods import DEFAULT_METHODS, TOURNAMENT_METHODS, Method
from examples.toy_rl.policy import GRUPolicy, WarmupConfig, warm_up
from examples.toy_rl.report import combine_seeds, format_checks, format_table, plot_curves, write_json
from examples.toy_rl.task import VOCAB, SortTask
from examples.toy_rl.train import RLConfig, evaluate, run_method, summarise_run
from sspo_kernels import boundary_table

METHOD_NAMES = tuple(m.name for m in TOURNAMENT_METHODS)
BOUNDED_NAMES = tuple(m.name for m in TOURNAMENT_METHODS if m.rule.objective in BOUNDED)
DEMO_SEEDS, DEMO_ITERATIONS = [0], 50
TOURNAMENT_SEEDS, TOURNAMENT_ITERATIONS = [0, 1, 2, 3, 4], 25
DEMO_EVAL, TOURNAMENT_EVAL = 512, 2048  # the tournament compares gains: less evaluation noise


def _clip_override(text: str) -> tuple[str, float, float]:
    """'GSPO=3e-4,4e-4' -> ('GSPO', 3e-4, 4e-4)."""
    try:
        name, widths = text.split("=")
        low, high = (float(w) for w in widths.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected METHOD=LOW,HIGH (e.g. GSPO=3e-4,4e-4), got {text!r}") from None
    if name not in BOUNDED_NAMES:
        raise argparse.ArgumentTypeError(f"unknown or unbounded method {name!r}; one of {', '.join(BOUNDED_NAMES)}")
    return name, low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.toy_rl",
        description="GRPO (token), GSPO (sequence) and SSPO (subsentence) on a toy sorting task: what each clips. "
        "With --tournament: every objective at its granularities, over seeds and two levels of off-policyness.",
    )
    p.add_argument(
        "--tournament", action="store_true",
        help="run the tournament (tournament.py): every objective, >= 5 seeds, the default and a more off-policy "
        "setting; writes tournament.json, tournament.md and tournament.png",
    )  # fmt: skip
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None,
        help=f"one warm-up and one run per method per seed (default {DEMO_SEEDS}; tournament {TOURNAMENT_SEEDS})",
    )  # fmt: skip
    p.add_argument(
        "--iterations", type=int, default=None,
        help=f"RL iterations per run (default {DEMO_ITERATIONS}; tournament {TOURNAMENT_ITERATIONS})",
    )  # fmt: skip
    p.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (the advantage's group)")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs over each rollout")
    p.add_argument("--minibatches", type=int, default=4, help="updates per epoch")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of the RL updates")
    p.add_argument(
        "--methods", nargs="+", choices=METHOD_NAMES, default=None,
        help="default: GRPO GSPO SSPO; tournament: all of them",
    )  # fmt: skip
    p.add_argument(
        "--off-policy-scale", type=int, default=4,
        help="tournament: the off-policy setting uses this many times --minibatches (smaller steps, more of them)",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="tournament: runs in parallel, one process each")
    p.add_argument(
        "--settings", nargs="+", choices=("default", "off-policy"), default=["default", "off-policy"],
        help="tournament: which levels of off-policyness to run (default both)",
    )  # fmt: skip
    p.add_argument(
        "--report-from", type=Path, default=None, metavar="JSON",
        help="tournament: no runs; recompute the summaries, table and PNG from a tournament.json's per-seed runs",
    )  # fmt: skip
    p.add_argument(
        "--clip", type=_clip_override, action="append", default=[], metavar="METHOD=LOW,HIGH",
        help="clip widths eps_low,eps_high of a method (repeatable); default: the package's per-granularity "
        "defaults GRPO=0.2,0.28 GSPO=3e-4,4e-4 SSPO=8e-3,1.1e-2 (and the other bounded objectives' own)",
    )  # fmt: skip
    p.add_argument("--min-len", type=int, default=3, help="fewest numbers to sort")
    p.add_argument("--max-len", type=int, default=5, help="most numbers to sort")
    p.add_argument("--warmup-steps", type=int, default=600, help="supervised steps before RL")
    p.add_argument("--warmup-batch", type=int, default=64)
    p.add_argument("--warmup-lr", type=float, default=3e-3, help="Adam learning rate of the warm-up")
    p.add_argument("--warmup-noise", type=float, default=0.5, help="share of warm-up targets with one mistake")
    p.add_argument("--embed", type=int, default=64, help="policy embedding width")
    p.add_argument("--hidden", type=int, default=128, help="policy GRU width")
    p.add_argument(
        "--eval-prompts", type=int, default=None,
        help=f"fixed prompts for the start / end reward (default {DEMO_EVAL}; tournament {TOURNAMENT_EVAL})",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (results depend on it)")
    p.add_argument("--out", type=Path, default=Path("examples/out"), help="where the JSON and the PNG go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--keep-updates", action="store_true",
        help="also write every update's metrics beside the loop's recomputation into the JSON (large)",
    )  # fmt: skip
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options whose default depends on --tournament."""
    if args.seeds is None:
        args.seeds = list(TOURNAMENT_SEEDS if args.tournament else DEMO_SEEDS)
    if args.iterations is None:
        args.iterations = TOURNAMENT_ITERATIONS if args.tournament else DEMO_ITERATIONS
    if args.eval_prompts is None:
        args.eval_prompts = TOURNAMENT_EVAL if args.tournament else DEMO_EVAL
    if args.methods is None:
        args.methods = list(METHOD_NAMES if args.tournament else (m.name for m in DEFAULT_METHODS))
    return args


def chosen_methods(args: argparse.Namespace) -> list[Method]:
    overrides = {name: (low, high) for name, low, high in args.clip}
    methods = []
    for m in TOURNAMENT_METHODS:
        if m.name in args.methods:
            if m.name in overrides:
                low, high = overrides[m.name]
                m = replace(m, rule=replace(m.rule, eps_low=low, eps_high=high))
            methods.append(m)
    return methods


def warm_seed(args: argparse.Namespace, task: SortTask, seed: int) -> dict:
    """One seed's supervised warm-up: the weights, the fixed evaluation prompts and the start reward."""
    warm = WarmupConfig(args.warmup_steps, args.warmup_batch, args.warmup_lr, args.warmup_noise)
    torch.manual_seed(seed)
    policy = GRUPolicy(args.embed, args.hidden)
    t0 = time.perf_counter()
    losses = warm_up(policy, task, warm, torch.Generator().manual_seed(seed))
    eval_problems = task.sample(args.eval_prompts, torch.Generator().manual_seed(10_000 + seed))
    return {
        "seed": seed,
        "state": copy.deepcopy(policy.state_dict()),
        "eval_problems": eval_problems,
        "reward_start": evaluate(policy, task, eval_problems, 20_000 + seed),
        "record": {"seed": seed, "seconds": time.perf_counter() - t0, "final_loss": losses[-1] if losses else None},
    }


def train_from(args: argparse.Namespace, task: SortTask, warm: dict, method: Method, rl: RLConfig) -> dict:
    """One RL run of `method` from a seed's warmed-up weights; its summary (see train.summarise_run)."""
    seed = warm["seed"]
    policy = GRUPolicy(args.embed, args.hidden)
    policy.load_state_dict(warm["state"])
    run_log = run_method(policy, task, method, rl, boundary_table(list(VOCAB)), seed)
    summary = summarise_run(run_log, method.rule.objective)
    summary.update(seed=seed, reward_start=warm["reward_start"], curves=run_log.curves)
    summary["reward_end"] = evaluate(policy, task, warm["eval_problems"], 20_000 + seed)
    if args.keep_updates:
        summary["updates"] = run_log.updates
    return summary


def rl_config(args: argparse.Namespace, minibatches: int | None = None) -> RLConfig:
    return RLConfig(args.iterations, args.prompts, args.group, args.epochs, minibatches or args.minibatches, args.lr)


def base_config(args: argparse.Namespace, task: SortTask) -> dict:
    warm = WarmupConfig(args.warmup_steps, args.warmup_batch, args.warmup_lr, args.warmup_noise)
    return {
        "task": {"min_len": task.min_len, "max_len": task.max_len, "vocab": list(VOCAB)},
        "policy": {"embed": args.embed, "hidden": args.hidden, "layers": 2},
        "warmup": vars(warm),
        "seeds": list(args.seeds),
        "eval_prompts": args.eval_prompts,
        "threads": args.threads,
    }


def run_demo(args: argparse.Namespace, log=print) -> dict:
    """Run every seed and method; returns the JSON payload."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task = SortTask(args.min_len, args.max_len)
    rl = rl_config(args)
    methods = chosen_methods(args)
    runs: dict[str, list[dict]] = {m.name: [] for m in methods}
    warmups = []
    for seed in args.seeds:
        warm = warm_seed(args, task, seed)
        warmups.append(warm["record"])
        log(
            f"seed {seed}: warm-up {args.warmup_steps} steps in {warm['record']['seconds']:.0f} s, "
            f"reward of the warmed-up policy {warm['reward_start']:.3f}",
            flush=True,
        )
        for m in methods:
            summary = train_from(args, task, warm, m, rl)
            runs[m.name].append(summary)
            log(
                f"seed {seed}: {m.name} ({m.rule.granularity}) {rl.iterations} iterations in "
                f"{summary['seconds']:.0f} s: reward {summary['reward_start']:.3f} -> {summary['reward_end']:.3f}, "
                f"clip {summary['clip_frac']:.3f}, fully clipped {summary['fully_clipped']:.1%}",
                flush=True,
            )
    per_method = {}
    for m in methods:
        per_method[m.name] = {**m.settings(), **combine_seeds(runs[m.name]), "seeds": runs[m.name]}
    return {
        "config": {**base_config(args, task), "rl": vars(rl)},
        "warmup": warmups,
        "methods": per_method,
        "total_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict:
    args = resolve_defaults(build_parser().parse_args(argv))
    if args.tournament or args.report_from is not None:
        from examples.toy_rl.tournament import main_tournament

        return main_tournament(args)
    payload = run_demo(args)
    print()
    print(format_table(payload["methods"], len(args.seeds)))
    print(format_checks(payload["methods"]))
    json_path = args.out / "toy_rl.json"
    write_json(json_path, payload)
    written = [str(json_path)]
    if not args.no_plot:
        png_path = args.out / "toy_rl.png"
        title = (
            f"sort {args.min_len}..{args.max_len} numbers, {args.iterations} iterations x {args.prompts}x{args.group} "
            f"samples, {len(args.seeds)} seed(s)"
        )
        plot_curves(png_path, payload["methods"], title)
        written.append(str(png_path))
    print(f"wrote {', '.join(written)} (total {payload['total_seconds']:.0f} s)")
    return payload
