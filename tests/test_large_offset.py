"""Rows that start past 2^31 elements are addressed with 64-bit offsets.

A (14200, 152064) bf16 tensor is 4.3 GB, but `torch.empty` only reserves it: the script fills the last
rows (all past element 2^31) and launches only those, so it touches a few MB. It runs in a subprocess
because an int32 offset overflow kills the process with SIGSEGV instead of raising: on the CPU with
the Triton interpreter, and on CUDA (marked gpu) compiled, where the tensor takes 4.3 GB of device
memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _devices import DEVICES

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    import torch

    device = sys.argv[2]
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
    from _assert import assert_close, assert_rel_norm

    from reference import naive_logprob_entropy
    from sspo_kernels.ops.vocab.triton import logprob_entropy_bwd, logprob_entropy_fwd

    rows, vocab, last, tau = 14200, 152064, 3, 0.7
    first = rows - last
    assert first * vocab > 2**31
    logits = torch.empty(rows, vocab, dtype=torch.bfloat16, device=device)
    gen = torch.Generator().manual_seed(0)
    tail = (torch.randn(last, vocab, generator=gen) * 3).to(torch.bfloat16)
    logits[first:] = tail.to(device)
    tokens = torch.full((rows,), -100, dtype=torch.int64)
    tokens[first:] = torch.randint(0, vocab, (last,), generator=gen)
    mask = tokens >= 0
    g = torch.randn(rows, generator=gen) * mask
    e = torch.randn(rows, generator=gen) * mask

    x = tail.double().requires_grad_(True)
    ref_logp, ref_entropy = naive_logprob_entropy(x, tokens[first:], tau)
    (g[first:].double() * ref_logp + e[first:].double() * ref_entropy).sum().backward()

    # the same buffer as (N, V) rows and as a (B, T, V) batch whose last rows sit past 2^31
    for view in (logits, logits.view(2, rows // 2, vocab)):
        args = (view, tokens.to(device), mask.to(device))
        logp, entropy, lse = logprob_entropy_fwd(*args, tau, row_start=first, num_rows=last)
        assert_close("logp", logp[first:], ref_logp, atol=1e-5, rtol=1e-4)
        assert_close("entropy", entropy[first:], ref_entropy, atol=1e-5, rtol=1e-4)
        grad = logprob_entropy_bwd(
            *args, lse, entropy, g.to(device), e.to(device), tau, inplace=True, row_start=first, num_rows=last
        )
        assert grad.data_ptr() == logits.data_ptr()
        assert_rel_norm("grad_logits", logits[first:], x.grad, tol=1e-2)
        logits[first:] = tail.to(device)
    print("ok")
    """
)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_past_2_pow_31_elements(device):
    env = {**os.environ, "SSPO_KERNELS_POISON": "1"}
    if device == "cuda":  # compiled, whatever this process uses
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO), device], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, f"exit {proc.returncode} (-11 is SIGSEGV: a 32-bit offset)\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip().endswith("ok")
