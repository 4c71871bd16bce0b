"""verl's fused forward on `sspo_kernels.integrations.verl.linear_cross_entropy`, with the real library on the CPU.

- The function against verl 0.9.1's own torch implementation, `FusedLinearForPPOFunction` (chunks of 512 tokens):
  log-probs, entropies and the hidden and weight gradients for random upstream gradients, fp32, 1e-5; FSDP's
  `(1, N, H)` / `(B, T, H)` and Megatron's `(S, 1, H)` layouts, a hidden size that is no multiple of 128.
- verl's real wiring: a tiny random Qwen2 patched by verl's `patch_forward_with_backends` with
  `impl_backend="triton"` after `install_fused()` runs `dense_common.forward_with_triton_backend`, which imports
  the function at call time; its outputs and every parameter gradient equal those of verl's
  `impl_backend="torch"` forward (`FusedLinearForPPO`) on the same model.
- The switch: `SSPO_VERL_FUSED=1` makes the plugin's `install()` route verl's function to ours, the README's
  Hydra overrides put it into the workers' runtime env, and Megatron's modules that bound verl's function at
  import are re-pointed.
- Tensor parallel against verl's contract (weight rows per rank, global labels, the hidden gradient a partial sum)
  on 2 gloo processes: `megatron_tp` below, run inside tests/test_token_logprobs_tp.py's 2-process spawn (one
  start-up for all the tensor-parallel cases) as its case `verl_linear_cross_entropy_tp`.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("verl") is None:
    pytest.skip("needs verl (extra 'verl')", allow_module_level=True)

from _assert import assert_close, assert_rel_norm
from verl.utils.experimental.torch_functional import FusedLinearForPPOFunction

import sspo_kernels.integrations.verl as plugin

pytestmark = pytest.mark.usefixtures("one_thread")

KERNEL_MODULE = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
VERL_KERNEL = KERNEL_MODULE.linear_cross_entropy
TOL = 1e-5
WORST: dict[str, float] = {}  # printed: the measured differences against verl


def _note(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = ours.detach().double() - theirs.detach().double()
    err, rel = float(diff.abs().max()), float(diff.norm() / theirs.detach().double().norm().clamp(min=1e-300))
    prev = WORST.get(name, (0.0, 0.0))
    WORST[name] = (max(prev[0], err), max(prev[1], rel))


def _inputs(seed: int, hidden_shape, labels_shape, v: int = 203, h: int = 24):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*hidden_shape, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.5
    labels = torch.randint(0, v, labels_shape, generator=gen)
    return hidden, weight, labels


def _run(fn, hidden, weight, labels, g, e):
    hid, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, ent = fn(hid, w, labels)
    outs = [(o.reshape(-1), u) for o, u in ((logp, g), (ent, e)) if u is not None]
    torch.autograd.backward([o for o, _ in outs], [u for _, u in outs])
    return logp, ent, hid.grad, w.grad


LAYOUTS = {  # hidden's leading shape, labels' shape, verl's torch implementation's view of them
    "fsdp-rmpad (1, N, H)": ((1, 37), (1, 37)),
    "padded (B, T, H)": ((3, 11), (3, 11)),
    "megatron (S, 1, H)": ((29, 1), (1, 29)),
}


@pytest.mark.parametrize("upstreams", ["both", "logp-only"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_equals_verl_fused_linear_for_ppo(layout, upstreams):
    hidden_shape, labels_shape = LAYOUTS[layout]
    hidden, weight, labels = _inputs(len(layout), hidden_shape, labels_shape)
    n = labels.numel()
    gen = torch.Generator().manual_seed(3)
    g, e = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    e = None if upstreams == "logp-only" else e
    tau = 0.7

    def ours(h, w, y):
        return plugin.linear_cross_entropy(h, w, y, tau, "none")

    def verls(h, w, y):  # verl's torch path wants (T, H) with (T,) ids or (B, T, H) with (B, T)
        return FusedLinearForPPOFunction.apply(h.reshape(-1, h.shape[-1]), w, y.reshape(-1), tau, 16)

    mine = _run(ours, hidden, weight, labels, g, e)
    theirs = _run(verls, hidden, weight, labels, g, e)
    assert mine[0].shape == labels.shape and mine[0].dtype == torch.float32
    for name, a, b in zip(("logprobs", "entropy"), mine[:2], theirs[:2]):
        _note(name, a.reshape(-1), b.reshape(-1))
        assert_close(name, a.reshape(-1), b.reshape(-1), atol=TOL)
    for name, a, b in zip(("dhidden", "dweight"), mine[2:], theirs[2:]):
        _note(name, a, b.reshape(a.shape))
        assert_rel_norm(name, a, b.reshape(a.shape), tol=TOL)
    print(f"\nworst |ours - verl| (max abs, rel norm): {WORST}")


def test_contract_details():
    """-100 labels give 0 and no gradient (verl's kernel leaves them undefined, its torch path fails); only
    reduction="none"; a hidden row per label."""
    hidden, weight, labels = _inputs(5, (1, 8), (1, 8))
    labels[0, 3] = -100
    h = hidden.clone().requires_grad_(True)
    logp, ent = plugin.linear_cross_entropy(h, weight, labels, 1.0)
    assert logp[0, 3] == 0 and ent[0, 3] == 0
    (logp.sum() + ent.sum()).backward()
    assert (h.grad[0, 3] == 0).all() and h.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reduction"):
        plugin.linear_cross_entropy(hidden, weight, labels, 1.0, "mean")
    with pytest.raises(ValueError, match="one row per label"):
        plugin.linear_cross_entropy(hidden, weight, labels[:, :5], 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the product in the autocast dtype, as verl's torch path
        logp, _ = plugin.linear_cross_entropy(hidden, weight, labels, 1.0)
    assert logp.dtype == torch.float32


def test_install_fused_repoints_verl_and_megatron_binders(monkeypatch):
    monkeypatch.setattr(KERNEL_MODULE, "linear_cross_entropy", VERL_KERNEL)  # restored after the test
    megatron = types.ModuleType("verl.models.mcore.model_forward_fused")
    megatron.linear_cross_entropy = VERL_KERNEL  # bound at import, as Megatron's forward does
    monkeypatch.setitem(sys.modules, megatron.__name__, megatron)
    plugin.install_fused()
    plugin.install_fused()  # idempotent
    assert KERNEL_MODULE.linear_cross_entropy is plugin.linear_cross_entropy
    assert megatron.linear_cross_entropy is plugin.linear_cross_entropy


# ---------------------------------------------------------------- verl's real forward


def test_qwen2_forward_patched_by_verl(monkeypatch):
    """verl's `patch_forward_with_backends` with impl_backend="triton" after `install_fused()`: the model's
    log-probs, entropies and gradients equal those of verl's impl_backend="torch" forward."""
    transformers = pytest.importorskip("transformers")
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    cls = transformers.Qwen2ForCausalLM
    monkeypatch.setattr(cls, "forward", cls.forward)  # verl patches the class: restored after the test
    monkeypatch.setattr(KERNEL_MODULE, "linear_cross_entropy", VERL_KERNEL)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=301, hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = cls(config).float()
    input_ids = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    gen = torch.Generator().manual_seed(2)
    g, e = torch.randn(2, 9, generator=gen), torch.randn(2, 9, generator=gen)
    calls = []
    real = plugin.token_logprobs_from_hidden
    monkeypatch.setattr(plugin, "token_logprobs_from_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))

    results = {}
    for backend in ("torch", "triton"):
        if backend == "triton":
            plugin.install_fused()
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, attention_mask=attention_mask, temperature=0.8, return_dict=True)
        ((out.log_probs * g).sum() + (out.entropy * e).sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results[backend] = (out.log_probs.detach(), out.entropy.detach(), grads)
    assert calls, "verl's triton forward did not reach sspo_kernels"
    (lp_t, ent_t, grads_t), (lp_o, ent_o, grads_o) = results["torch"], results["triton"]
    assert lp_o.shape == lp_t.shape == (2, 9)
    _note("model logprobs", lp_o, lp_t)
    _note("model entropy", ent_o, ent_t)
    assert_close("logprobs", lp_o, lp_t, atol=TOL)
    assert_close("entropy", ent_o, ent_t, atol=TOL)
    for name, grad in grads_t.items():
        _note("model grads", grads_o[name], grad)
        assert_rel_norm(f"d{name}", grads_o[name], grad, tol=TOL)
    print(f"\nworst |ours - verl| (max abs, rel norm): {WORST}")


def test_env_switch(monkeypatch):
    """`install()` (what importing the plugin runs in every worker) routes verl's kernel to ours exactly when
    SSPO_VERL_FUSED is set; that `import verl` imports the plugin in every process is test_integration_verl.py's
    entry-point test."""
    monkeypatch.setattr(KERNEL_MODULE, "linear_cross_entropy", VERL_KERNEL)
    monkeypatch.delenv(plugin.FUSED_ENV, raising=False)
    plugin.install()
    assert KERNEL_MODULE.linear_cross_entropy is VERL_KERNEL
    monkeypatch.setenv(plugin.FUSED_ENV, "1")
    plugin.install()
    assert KERNEL_MODULE.linear_cross_entropy is plugin.linear_cross_entropy


def test_readme_overrides_reach_the_workers_environment():
    """The README's overrides compose with verl's trainer config, and the variable lands in the runtime env that
    verl's `main_ppo` hands to `ray.init` (so every worker imports the plugin with it set)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    config_dir = Path(importlib.util.find_spec("verl").submodule_search_locations[0]) / "trainer" / "config"
    overrides = [
        "actor_rollout_ref.model.use_fused_kernels=True",
        "actor_rollout_ref.model.fused_kernel_options.impl_backend=triton",
        f'+ray_kwargs.ray_init.runtime_env.env_vars.{plugin.FUSED_ENV}="1"',
    ]
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    assert cfg.actor_rollout_ref.actor.use_fused_kernels is True
    assert cfg.actor_rollout_ref.model.fused_kernel_options.impl_backend == "triton"
    runtime_env = OmegaConf.merge(get_ppo_ray_runtime_env(cfg), cfg.ray_kwargs.ray_init.runtime_env)  # as main_ppo
    assert OmegaConf.to_container(runtime_env)["env_vars"][plugin.FUSED_ENV] == "1"


# ---------------------------------------------------------------- tensor parallel (run by test_token_logprobs_tp.py)


def megatron_tp(rank: int, world: int, group) -> None:
    """Each rank: its rows of the weight, Megatron's (S, 1, H) hidden and (1, S) global labels; outputs equal
    verl's torch implementation on the full weight, the weight gradient its rows, the hidden gradients summed
    over the ranks the full one (verl's contract: each rank returns its partial sum)."""
    import torch.distributed as dist

    hidden, weight, labels = _inputs(11, (23, 1), (1, 23), v=102, h=20)
    gen = torch.Generator().manual_seed(12)
    g, e = torch.randn(23, generator=gen), torch.randn(23, generator=gen)
    start, end = rank * 51, (rank + 1) * 51  # verl's contract: rank r holds rows [r V_local, (r + 1) V_local)

    def ours(h, w, y):
        return plugin.linear_cross_entropy(h, w[start:end], y, 0.9, "none", group)

    def verls(h, w, y):
        return FusedLinearForPPOFunction.apply(h.reshape(-1, h.shape[-1]), w, y.reshape(-1), 0.9, 8)

    logp, ent, dh, dw = _run(ours, hidden, weight, labels, g, e)
    want = _run(verls, hidden, weight, labels, g, e)
    assert_close("logprobs", logp.reshape(-1), want[0], atol=TOL)
    assert_close("entropy", ent.reshape(-1), want[1], atol=TOL)
    assert_rel_norm("dweight (local rows)", dw[start:end], want[3][start:end], tol=TOL)
    assert (dw[:start] == 0).all() and (dw[end:] == 0).all()
    dist.all_reduce(dh, group=group)
    assert_rel_norm("dhidden (summed over ranks)", dh, want[2].reshape(dh.shape), tol=TOL)
