"""The models only TRL's own head covers, through the adapter's log-probs path on that head: a tiny random
Qwen2-MoE (TRL adds its router aux loss by default) and a Qwen2 whose config asks TRL's head for Gemma-2-style
soft-capping and a logit scale; which models the package's head serves. The comparison, the world and the case
settings are `test_integration_trl_grid.py`'s.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from test_integration_trl import gpt2_tokenizer, prompt_dataset, save_tiny_model, tiny_config  # noqa: E402
from test_integration_trl_grid import _case_id, _settings, build_world, compare, configure, make_trainer  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return prompt_dataset()


def test_package_head_only_for_plain_text_models():
    """A vision-language config (a text config of its own) or a prompt-learning adapter: TRL's head. Logit
    transforms stay on the package's head, read as TRL's head reads them."""
    from types import SimpleNamespace

    from sspo_kernels.integrations.trl import logit_transform, package_head_ok

    head = torch.nn.Linear(4, 8, bias=False)
    text = transformers.Qwen2Config(hidden_size=4, num_attention_heads=1, num_key_value_heads=1)
    lm = lambda config, **kw: SimpleNamespace(config=config, get_output_embeddings=lambda: head, **kw)
    assert package_head_ok(lm(text))
    assert logit_transform(lm(text)) == {"logit_scale": 1.0, "logit_softcap": None}
    assert not package_head_ok(lm(transformers.Qwen2VLConfig(text_config=text.to_dict())))
    cases = [("final_logit_softcapping", 30.0, (1.0, 30.0)), ("logit_scale", 0.5, (0.5, None)),
             ("output_multiplier", 3.0, (3.0, None)), ("lm_head_multiplier", 0.25, (0.25, None)),
             ("logits_scaling", 2.0, (0.5, None))]  # fmt: skip
    for name, value, (scale, softcap) in cases:
        model = lm(transformers.Qwen2Config(**{name: value}))
        assert package_head_ok(model), name
        assert logit_transform(model) == {"logit_scale": scale, "logit_softcap": softcap}, name
    prompt = {"default": SimpleNamespace(is_prompt_learning=True)}
    assert not package_head_ok(lm(text, peft_config=prompt))


@pytest.fixture(scope="module")
def moe(tokenizer, dataset, tmp_path_factory):
    """A random Qwen2-MoE (4 experts, top 2) whose config carries a router aux coefficient: TRL adds the
    load-balancing loss by default."""
    torch.manual_seed(0)
    config = tiny_config(
        transformers.Qwen2MoeConfig,
        tokenizer,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=32,
        router_aux_loss_coef=0.02,
    )
    path = save_tiny_model(transformers.Qwen2MoeForCausalLM(config), tokenizer, tmp_path_factory.mktemp("moe"))
    trainer = make_trainer(path, tokenizer, dataset, tmp_path_factory.mktemp("moe_out"))
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.02
    return trainer, build_world(trainer, perturb=0.1)


@pytest.fixture(scope="module")
def softcapped(tokenizer, dataset, tmp_path_factory):
    """A random Qwen2 whose config asks TRL's head for Gemma-2-style soft-capping and a logit scale."""
    torch.manual_seed(0)
    config = tiny_config(transformers.Qwen2Config, tokenizer, final_logit_softcapping=30.0, logit_scale=0.5)
    path = save_tiny_model(transformers.Qwen2ForCausalLM(config), tokenizer, tmp_path_factory.mktemp("softcap"))
    trainer = make_trainer(path, tokenizer, dataset, tmp_path_factory.mktemp("softcap_out"))
    return trainer, build_world(trainer)


MODEL_CASES = [
    {"loss_type": "dapo", "level": "token", "vllm": "off", "old": True, "beta": (0.04, True)},
    {"loss_type": "grpo", "level": "sequence", "vllm": "sequence_mask", "delta": 1.5, "opsm": 0.02,
     "entropy_q": 0.6, "ga": 2},
    {"loss_type": "cispo", "level": "token", "vllm": "token_truncate", "beta": (0.04, False), "bonus": "static",
     "cispo_cap": 5.0},
    {"loss_type": "vespo", "level": "token", "vllm": "token_mask", "entropy_q": 0.6, "bonus": "adaptive", "ga": 2},
]  # fmt: skip
MODEL_DEFAULTS = {"beta": (0.0, True), "delta": None, "opsm": None, "entropy_q": 1.0, "bonus": "off", "ga": 1,
                  "path": "auto", "tool_mask": False}  # fmt: skip


@pytest.mark.parametrize("kind", ["moe", "softcapped"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=[_case_id({**MODEL_DEFAULTS, **c}) for c in MODEL_CASES])
def test_trl_head_models_equal_trl(request, kind, case):
    """MoE (the router aux loss, from the backbone's router logits through TRL's head: the log-probs path on
    TRL's own head) and soft-capped / scaled logits (the package's paths, the transform in the vocabulary
    pass): every setting as for the dense model."""
    trainer, world = request.getfixturevalue(kind)
    case = {**MODEL_DEFAULTS, **case}
    inputs, micro = configure(trainer, case, world)
    route = trainer._sspo_route(_settings(trainer), inputs)
    assert route == "trl" if kind == "moe" else route in ("fused", "package"), route
    worst = compare(trainer, inputs, f"{kind} {_case_id(case)}", micro)
    print(f"\n{kind} {_case_id(case)}: worst {worst}")
