"""`SSPOGRPOTrainer` against TRL 1.16's `GRPOTrainer` in two processes: accelerate on 2 CPU processes over gloo,
the process group started from a file (no network), as `accelerate launch` would for a CPU run.

One `torch.multiprocessing.spawn` for the module (start-up is most of its time); each rank runs the tasks below,
catches each task's failure and writes the results to a file, and one pytest test per task reads them:

- `compute_loss`: the grid's comparison (`test_integration_trl_grid.compare`: loss, every gradient, metrics,
  entropy-controller state) on each rank's own TRL-made inputs, for settings whose values depend on every
  process: dapo's global normaliser, the entropy quantile over both processes' tokens (fused: the core's
  `entropy_mask_group`; log-probs path: TRL's `get_high_entropy_mask`), `clip_ratio/low_min` / `high_max` over
  processes, the adaptive controller's window reduced over processes;
- `one_step`: `GRPOTrainer` and `SSPOGRPOTrainer` train one SGD step each from the same seed (dapo, entropy
  mask, DDP's gradient averaging); the updated parameters agree;
- `subsentence`: a 2-process `train()` of two steps at subsentence granularity.

Run alone with `pytest -m distributed`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
from _collectives import spawn_ranks

pytest.importorskip("trl")
from test_integration_trl import gpt2_tokenizer, tiny_qwen2

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
DEADLINE_S = 420
ROWS_PER_RANK = [
    [{"prompt": "The cat sat"}] * 4 + [{"prompt": "Once upon a time,"}] * 4,
    [{"prompt": "Numbers: 1, 2,"}] * 4 + [{"prompt": "Why? Because"}] * 4,
]
CASES = [  # grid cases (test_integration_trl_grid.configure) whose numbers depend on both processes
    {"loss_type": "dapo", "level": "token", "vllm": "off", "old": True, "entropy_q": 0.6},  # fused, core quantile
    {"loss_type": "grpo", "level": "sequence", "vllm": "sequence_mask", "entropy_q": 0.6, "bonus": "static"},
    {"loss_type": "bnpo", "level": "token", "vllm": "token_truncate", "bonus": "adaptive", "ga": 2},
    {"loss_type": "vespo", "level": "token", "vllm": "token_mask", "beta": (0.04, True), "opsm": 0.02},
    {"loss_type": "cispo", "level": "sequence", "vllm": "off", "old": False, "delta": 1.5, "cispo_cap": 1.2},
    {"loss_type": "sapo", "level": "token", "vllm": "sequence_truncate", "entropy_q": 0.6, "path": "logprobs"},
]
DEFAULTS = {"beta": (0.0, True), "delta": None, "opsm": None, "entropy_q": 1.0, "bonus": "off", "ga": 1,
            "path": "auto", "tool_mask": False, "old": True}  # fmt: skip


def _config(cls, out_dir: str, **overrides):
    from test_integration_trl import config_kwargs

    kw = config_kwargs(out_dir, disable_tqdm=True, **overrides)
    return cls(**kw)


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _same_on_every_rank(x: torch.Tensor) -> bool:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return all(torch.equal(parts[0], p) for p in parts)


def task_compute_loss(rank: int, model_path: str, tok, data, out_dir: str) -> dict:
    import test_integration_trl_grid as grid

    trainer = grid.make_trainer(model_path, tok, data, os.path.join(out_dir, "grid"))
    assert trainer.accelerator.num_processes == WORLD
    world = grid.build_world(trainer, rows=ROWS_PER_RANK[rank])
    worst, failures = {}, []
    for case in CASES:  # every case runs (the processes stay in step); the failures are raised at the end
        case = {**DEFAULTS, **case}
        inputs, micro = grid.configure(trainer, case, world)
        try:
            worst[grid._case_id(case)] = grid.compare(trainer, inputs, f"rank {rank} {grid._case_id(case)}", micro)
        except AssertionError as exc:
            failures.append(str(exc))
    # the quantile over both processes differs from this rank's own: a per-process quantile would fail above
    inputs = world["off_old"]
    with torch.no_grad():
        _, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1),
            compute_entropy=True,
        )  # fmt: skip
    mask = inputs["completion_mask"]
    local = torch.quantile(entropies[mask.bool()], 0.4)
    both = trainer.get_high_entropy_mask(entropies, mask, 0.4)
    differs = torch.tensor([float(not torch.equal(both, (entropies >= local) & mask.bool()))])
    torch.distributed.all_reduce(differs)
    assert differs.item() > 0, "the two processes' entropies give the same masks as each process's own"
    assert not failures, "\n".join(failures)
    return worst


def task_one_step(rank: int, model_path: str, tok, data, out_dir: str) -> dict:
    """One SGD step of TRL's trainer and of ours from the same seed: the same update (DDP-averaged gradients)."""
    import transformers
    from test_integration_trl import reward_len
    from trl import GRPOConfig, GRPOTrainer

    from sspo_kernels.integrations.trl import SSPOGRPOConfig, SSPOGRPOTrainer

    kw = dict(max_steps=1, optim="sgd", learning_rate=0.05, loss_type="dapo", top_entropy_quantile=0.5,
              mask_truncated_completions=True, max_grad_norm=1e9)  # fmt: skip
    deltas, seconds = [], []
    for config_cls, trainer_cls in ((GRPOConfig, GRPOTrainer), (SSPOGRPOConfig, SSPOGRPOTrainer)):
        args = _config(config_cls, os.path.join(out_dir, trainer_cls.__name__), **kw)
        trainer = trainer_cls(model=model_path, reward_funcs=reward_len, args=args, train_dataset=data,
                              processing_class=tok)  # fmt: skip
        before = _flat_params(trainer.model)
        transformers.set_seed(7)  # the same completions for both trainers
        start = time.perf_counter()
        trainer.train()
        seconds.append(time.perf_counter() - start)
        after = _flat_params(trainer.model)
        assert _same_on_every_rank(after), f"{trainer_cls.__name__}: the ranks' parameters differ after the step"
        deltas.append(after - before)
    peer, ours = deltas
    assert peer.norm() > 0, "TRL's step moved nothing"
    rel = float((ours - peer).norm() / peer.norm())
    assert rel <= 1e-5, f"updated parameters: relative difference {rel:.3g} > 1e-5"
    return {"update_rel_diff": rel, "trl_step_s": seconds[0], "sspo_step_s": seconds[1]}


def task_subsentence(rank: int, model_path: str, tok, data, out_dir: str) -> dict:
    from test_integration_trl import reward_len

    from sspo_kernels.integrations.trl import SSPOGRPOConfig, SSPOGRPOTrainer

    args = _config(SSPOGRPOConfig, os.path.join(out_dir, "subsentence"), loss_type="grpo", max_steps=2,
                   granularity="subsentence", entropy_gamma=0.5)  # fmt: skip
    trainer = SSPOGRPOTrainer(model=model_path, reward_funcs=reward_len, args=args, train_dataset=data,
                              processing_class=tok)  # fmt: skip
    before = _flat_params(trainer.model)
    trainer.train()
    after = _flat_params(trainer.model)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert all("sspo/num_segments" in h for h in logged)
    assert not torch.equal(before, after) and _same_on_every_rank(after)
    return {"segments": [h["sspo/num_segments"] for h in logged]}


TASKS = {"compute_loss": task_compute_loss, "one_step": task_one_step, "subsentence": task_subsentence}


def _worker(rank: int, init_file: str, model_path: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")  # fmt: skip
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    import transformers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))  # fmt: skip
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(model_path)
    from test_integration_trl import prompt_dataset

    data = prompt_dataset()
    results: dict[str, dict] = {}
    for name, task in TASKS.items():
        start = time.perf_counter()
        try:
            value, error = task(rank, model_path, tok, data, os.path.join(out_dir, f"rank{rank}", name)), None
        except Exception as exc:  # reported by the pytest test of this task
            value, error = None, f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"[{name}] {error}", file=sys.stderr, flush=True)
        results[name] = {"value": value, "error": error, "seconds": round(time.perf_counter() - start, 2)}
        ok = torch.tensor([0.0 if error is None else 1.0])
        dist.all_reduce(ok)  # keeps the ranks in step
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    model_dir = tiny_qwen2(gpt2_tokenizer(), tmp_path_factory.mktemp("tiny_qwen2"))
    make_args = lambda tmp: (os.path.join(tmp, "init"), model_dir, tmp)
    return spawn_ranks(_worker, WORLD, DEADLINE_S, "sspo-trl-dist-", make_args)


def _results(ranks, task: str) -> list:
    errors = [r[task]["error"] for r in ranks if r[task]["error"]]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    lines = [f"rank {i} {r[task]['seconds']} s: {r[task]['value']}" for i, r in enumerate(ranks)]
    print(f"\n{task}: " + "; ".join(lines))
    return [r[task]["value"] for r in ranks]


def test_two_process_compute_loss_equals_trl(ranks):
    values = _results(ranks, "compute_loss")
    assert all(len(v) == len(CASES) for v in values)


def test_two_process_one_step_equals_trl(ranks):
    values = _results(ranks, "one_step")
    assert all(v["update_rel_diff"] <= 1e-5 for v in values)


def test_two_process_subsentence_train(ranks):
    values = _results(ranks, "subsentence")
    assert all(len(v["segments"]) == 2 for v in values)
