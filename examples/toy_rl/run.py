"""The demo's driver: per seed, one supervised warm-up, then each method's RL run from a copy of it.

`python -m examples.toy_rl --help` lists the options; `bash ci/demo.sh` runs the defaults.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch

from examples.toy_rl.measure import ClipRule
from examples.toy_rl.policy import GRUPolicy, WarmupConfig, warm_up
from examples.toy_rl.report import combine_seeds, format_checks, format_table, plot_curves, write_json
from examples.toy_rl.task import VOCAB, SortTask
from examples.toy_rl.train import DEFAULT_METHODS, Method, RLConfig, evaluate, run_method, summarise_run
from sspo_kernels import boundary_table

METHOD_NAMES = tuple(m.name for m in DEFAULT_METHODS)


def _clip_override(text: str) -> tuple[str, float, float]:
    """'GSPO=3e-4,4e-4' -> ('GSPO', 3e-4, 4e-4)."""
    try:
        name, widths = text.split("=")
        low, high = (float(w) for w in widths.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected METHOD=LOW,HIGH (e.g. GSPO=3e-4,4e-4), got {text!r}") from None
    if name not in METHOD_NAMES:
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; one of {', '.join(METHOD_NAMES)}")
    return name, low, high


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.toy_rl",
        description="GRPO (token), GSPO (sequence) and SSPO (subsentence) on a toy sorting task: what each clips.",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one warm-up and one run per method per seed")
    p.add_argument("--iterations", type=int, default=50, help="RL iterations per method")
    p.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (the advantage's group)")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs over each rollout")
    p.add_argument("--minibatches", type=int, default=4, help="updates per epoch")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate of the RL updates")
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(METHOD_NAMES))
    p.add_argument(
        "--clip", type=_clip_override, action="append", default=[], metavar="METHOD=LOW,HIGH",
        help="clip widths eps_low,eps_high of a method (repeatable); default: the package's per-granularity "
        "defaults GRPO=0.2,0.28 GSPO=3e-4,4e-4 SSPO=8e-3,1.1e-2",
    )  # fmt: skip
    p.add_argument("--min-len", type=int, default=3, help="fewest numbers to sort")
    p.add_argument("--max-len", type=int, default=5, help="most numbers to sort")
    p.add_argument("--warmup-steps", type=int, default=600, help="supervised steps before RL")
    p.add_argument("--warmup-batch", type=int, default=64)
    p.add_argument("--warmup-lr", type=float, default=3e-3, help="Adam learning rate of the warm-up")
    p.add_argument("--warmup-noise", type=float, default=0.5, help="share of warm-up targets with one mistake")
    p.add_argument("--embed", type=int, default=64, help="policy embedding width")
    p.add_argument("--hidden", type=int, default=128, help="policy GRU width")
    p.add_argument("--eval-prompts", type=int, default=512, help="fixed prompts for the start / end reward")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (results depend on it)")
    p.add_argument("--out", type=Path, default=Path("examples/out"), help="where toy_rl.json and toy_rl.png go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--keep-updates", action="store_true",
        help="also write every update's metrics beside the loop's recomputation into the JSON (large)",
    )  # fmt: skip
    return p


def chosen_methods(args: argparse.Namespace) -> list[Method]:
    overrides = {name: (low, high) for name, low, high in args.clip}
    methods = []
    for m in DEFAULT_METHODS:
        if m.name in args.methods:
            if m.name in overrides:
                low, high = overrides[m.name]
                m = replace(m, rule=replace(m.rule, eps_low=low, eps_high=high))
            methods.append(m)
    return methods


def _method_settings(m: Method) -> dict:
    r: ClipRule = m.rule
    return {
        "granularity": r.granularity,
        "eps_low": r.eps_low,
        "eps_high": r.eps_high,
        "entropy_gamma": r.entropy_gamma,
    }


def run_demo(args: argparse.Namespace, log=print) -> dict:
    """Run every seed and method; returns the JSON payload (also written to args.out unless None)."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task = SortTask(args.min_len, args.max_len)
    boundary = boundary_table(list(VOCAB))
    rl = RLConfig(args.iterations, args.prompts, args.group, args.epochs, args.minibatches, args.lr)
    warm = WarmupConfig(args.warmup_steps, args.warmup_batch, args.warmup_lr, args.warmup_noise)
    methods = chosen_methods(args)
    runs: dict[str, list[dict]] = {m.name: [] for m in methods}
    warmups = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        policy = GRUPolicy(args.embed, args.hidden)
        t0 = time.perf_counter()
        losses = warm_up(policy, task, warm, torch.Generator().manual_seed(seed))
        eval_problems = task.sample(args.eval_prompts, torch.Generator().manual_seed(10_000 + seed))
        reward_start = evaluate(policy, task, eval_problems, 20_000 + seed)
        warmups.append(
            {"seed": seed, "seconds": time.perf_counter() - t0, "final_loss": losses[-1] if losses else None}
        )
        log(
            f"seed {seed}: warm-up {warm.steps} steps in {warmups[-1]['seconds']:.0f} s, "
            f"reward of the warmed-up policy {reward_start:.3f}",
            flush=True,
        )
        state = copy.deepcopy(policy.state_dict())
        for m in methods:
            policy.load_state_dict(state)
            run_log = run_method(policy, task, m, rl, boundary, seed)
            summary = summarise_run(run_log)
            summary.update(seed=seed, reward_start=reward_start, curves=run_log.curves)
            summary["reward_end"] = evaluate(policy, task, eval_problems, 20_000 + seed)
            if args.keep_updates:
                summary["updates"] = run_log.updates
            runs[m.name].append(summary)
            log(
                f"seed {seed}: {m.name} ({m.rule.granularity}) {rl.iterations} iterations in "
                f"{summary['seconds']:.0f} s: reward {reward_start:.3f} -> {summary['reward_end']:.3f}, "
                f"clip {summary['clip_frac']:.3f}, fully clipped {summary['fully_clipped']:.1%}",
                flush=True,
            )
    per_method = {}
    for m in methods:
        per_method[m.name] = {**_method_settings(m), **combine_seeds(runs[m.name]), "seeds": runs[m.name]}
    payload = {
        "config": {
            "task": {"min_len": task.min_len, "max_len": task.max_len, "vocab": list(VOCAB)},
            "policy": {"embed": args.embed, "hidden": args.hidden, "layers": 2},
            "warmup": vars(warm),
            "rl": vars(rl),
            "seeds": list(args.seeds),
            "eval_prompts": args.eval_prompts,
            "threads": args.threads,
        },
        "warmup": warmups,
        "methods": per_method,
        "total_seconds": time.perf_counter() - started,
    }
    return payload


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
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
