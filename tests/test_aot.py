"""The launch heuristic, and the ahead-of-time compile of every configuration it can pick.

The interpreter accepts code the real compiler rejects and cannot show register spills, so CI also
compiles each configuration for sm_80 and sm_90 on the CPU (`python -m sspo_kernels.aot`), in a
subprocess without TRITON_INTERPRET: it fails on a compile error or any spilled byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sspo_kernels.ops.vocab.blocks import MAX_WARPS, all_vocab_block_configs, vocab_block_config

REPO = Path(__file__).resolve().parents[1]
VOCABS = [1, 100, 1000, 5003, 32000, 50257, 128256, 152064]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=["bf16", "fp16", "fp32", "fp64"])  # fmt: skip
@pytest.mark.parametrize("vocab", VOCABS, ids=[f"V{v}" for v in VOCABS])
def test_gpu_config_is_a_listed_config(vocab, dtype):
    config = vocab_block_config(vocab, dtype, interpret=False)
    assert config in all_vocab_block_configs(dtype)
    block_v, num_warps = config
    assert block_v & (block_v - 1) == 0 and 1 <= num_warps <= MAX_WARPS
    assert block_v >= min(vocab, 128) and 32 * num_warps <= block_v


def test_gpu_config_for_large_vocabularies():
    """Large vocabularies get 2048-8192 entries per iteration on 8-16 warps (16 KiB per iteration)."""
    assert vocab_block_config(152064, torch.bfloat16, interpret=False) == (8192, 16)
    assert vocab_block_config(152064, torch.float32, interpret=False) == (4096, 8)
    assert vocab_block_config(1000, torch.bfloat16, interpret=False) == (1024, 2)


def test_interpreter_config_reads_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert vocab_block_config(152064, torch.bfloat16) == (8192, 1)
    assert vocab_block_config(17, torch.float32) == (32, 1)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert vocab_block_config(152064, torch.bfloat16) == (8192, 16)


@pytest.mark.slow
def test_aot_compile_has_no_error_and_no_spill():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "sspo_kernels.aot"], capture_output=True, text=True, env=env, cwd=REPO, timeout=900
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"AOT compile failed or spilled:\n{report[-6000:]}"
    assert "; 0 failed" in proc.stdout
    for target in ("sm_80", "sm_90"):
        for kernel in ("logprob_entropy_fwd", "logprob_entropy_bwd"):
            assert any(kernel in line and target in line for line in proc.stdout.splitlines()), (kernel, target)
