"""The tournament (`bash ci/demo.sh --tournament`): every objective of the package at the granularities
where it is meaningful (methods.TOURNAMENT_METHODS), on several seeds and at two levels of
off-policyness, each run from its seed's one shared warm-up.

Per seed: one warm-up, its fixed evaluation prompts and start reward (run.warm_seed); then every
method under both settings from those weights, seeing the same first rollout. The settings differ in
the mini-batches per PPO epoch only: "default" uses --minibatches (4), "off-policy" --off-policy-scale
times as many (16). The same rollout then gets 4x as many Adam steps of a quarter of the size each, so
the later steps of an iteration run further from the rollout policy, for about the same compute (every
token still passes through the loss --epochs times); 4x the epochs would cost 4x the time.

Runs go to --workers processes (one torch thread each); a run's result depends only on its seed,
method, setting and the thread count, not on which process runs it or when.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed

import torch

from examples.toy_rl.methods import TOURNAMENT_METHODS, Method
from examples.toy_rl.report import write_json
from examples.toy_rl.run import base_config, chosen_methods, rl_config, train_from, warm_seed
from examples.toy_rl.task import SortTask
from examples.toy_rl.tournament_report import (
    aggregate,
    format_checks_summary,
    format_markdown,
    format_short,
    plot_tournament,
)

KEPT_CURVES = ("reward", "fully_clipped")  # per-seed curves kept in tournament.json


SETTING_NAMES = ("default", "off-policy")


def settings(args: argparse.Namespace) -> dict:
    """The levels of off-policyness chosen by --settings (both by default): {name: RLConfig}."""
    both = {"default": rl_config(args), "off-policy": rl_config(args, args.minibatches * args.off_policy_scale)}
    return {name: both[name] for name in args.settings}


class _Inline(Executor):
    """An executor that runs each job at once in this process (--workers 1)."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _executor(workers: int, threads: int) -> Executor:
    if workers <= 1:
        return _Inline()
    context = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads are running
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))


def _warm_job(args: argparse.Namespace, seed: int) -> dict:
    return warm_seed(args, SortTask(args.min_len, args.max_len), seed)


def _run_job(args: argparse.Namespace, warm: dict, method: Method, rl, setting: str) -> tuple[str, str, dict]:
    summary = train_from(args, SortTask(args.min_len, args.max_len), warm, method, rl)
    summary["curves"] = {k: summary["curves"][k] for k in KEPT_CURVES}
    return method.name, setting, summary


def run_tournament(args: argparse.Namespace, log=print) -> dict:
    """Every seed x setting x method; returns the JSON payload (see tournament_report.aggregate)."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    methods = chosen_methods(args)
    rls = settings(args)
    runs: dict[tuple[str, str], list[dict]] = {(m.name, s): [] for m in methods for s in rls}
    with _executor(args.workers, args.threads) as pool:
        warms = [f.result() for f in [pool.submit(_warm_job, args, seed) for seed in args.seeds]]
        for w in warms:
            log(
                f"seed {w['seed']}: warm-up {args.warmup_steps} steps in {w['record']['seconds']:.0f} s, "
                f"reward of the warmed-up policy {w['reward_start']:.3f}",
                flush=True,
            )
        jobs = [(w, m, s) for w in warms for s in rls for m in methods]
        futures = [pool.submit(_run_job, args, w, m, rls[s], s) for w, m, s in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            name, setting, summary = future.result()
            runs[(name, setting)].append(summary)
            log(
                f"[{done}/{len(jobs)} {time.perf_counter() - started:.0f} s] seed {summary['seed']} {name} {setting}: "
                f"{summary['seconds']:.0f} s, reward {summary['reward_start']:.3f} -> {summary['reward_end']:.3f}, "
                f"fully clipped {summary['fully_clipped']:.1%}",
                flush=True,
            )
    for key in runs:
        runs[key].sort(key=lambda r: args.seeds.index(r["seed"]))
    config = {
        **base_config(args, SortTask(args.min_len, args.max_len)),
        "settings": {name: vars(rl) for name, rl in rls.items()},
        "off_policy_scale": args.off_policy_scale,
        "workers": args.workers,
        "interval": "95 % Student t over seeds: mean +- t(0.975, n-1) * sd / sqrt(n)",
    }
    payload = aggregate(config, methods, list(rls), runs)
    payload["warmup"] = [w["record"] for w in warms]
    payload["total_seconds"] = time.perf_counter() - started
    return payload


def reaggregate(saved: dict) -> dict:
    """A tournament.json's payload with its summaries recomputed from its per-seed runs (--report-from)."""
    by_name = {m.name: m for m in TOURNAMENT_METHODS}
    methods = [by_name[name] for name in saved["methods"]]
    setting_names = list(saved["config"]["settings"])
    runs = {(m.name, s): saved["methods"][m.name]["settings"][s]["seeds"] for m in methods for s in setting_names}
    config = {k: v for k, v in saved["config"].items() if k != "baseline"}
    return {**saved, **aggregate(config, methods, setting_names, runs)}


def main_tournament(args: argparse.Namespace) -> dict:
    if args.report_from is not None:
        payload = reaggregate(json.loads(args.report_from.read_text()))
    elif len(args.seeds) < 2:
        raise SystemExit("the tournament needs at least 2 seeds for an interval (--seeds 0 1 ...)")
    else:
        payload = run_tournament(args)
    table = format_markdown(payload)
    print()
    print(table)
    print(format_checks_summary(payload))
    json_path = args.out / "tournament.json"
    write_json(json_path, payload)
    md_path = args.out / "tournament.md"
    md_path.write_text(f"{table}\n\nIn short:\n\n{format_short(payload)}\n")
    written = [str(json_path), str(md_path)]
    if not args.no_plot:
        png_path = args.out / "tournament.png"
        plot_tournament(png_path, payload)
        written.append(str(png_path))
    print(f"wrote {', '.join(written)} (total {payload['total_seconds']:.0f} s)")
    return payload
