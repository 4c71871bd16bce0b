"""Ahead-of-time compile every kernel configuration the heuristics can pick, on the CPU, for sm_80 and sm_90.

    python -m sspo_kernels.aot

The Triton interpreter accepts code the real compiler rejects, and cannot show register spills, so
this compiles each (kernel, dtype, BLOCK_V, num_warps, constexpr variant) for both targets with the
ptxas shipped in the triton wheel (no GPU or CUDA install needed), prints a table of registers, spill
bytes and shared memory, and exits non-zero on a compile error or any spill. Register and spill counts
come from re-running that ptxas with `-v` and Triton's own flags on the kernel's PTX.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from sspo_kernels.ops.vocab.blocks import all_vocab_block_configs, transform_block_config

TARGETS = (80, 90)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# the JIT's default on CUDA; the launchers do not override it
NUM_STAGES = 3
ALIGNMENTS = (16, 1)

_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
# integer arguments the JIT marks 16-divisible when their value is (the align=16 variant)
_ALIGNED_INTS = ("V", "stride_b", "stride_t", "stride_gb", "stride_gt")
REPORT_COLUMNS = (
    "kernel",
    "dtype",
    "block_v",
    "num_warps",
    "variant",
    "align",
    "target",
    "regs",
    "spill_stores",
    "spill_loads",
    "stack",
    "shared",
    "compile_s",
)
_PTXAS_LOG = {
    "regs": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
}


@functools.cache
def _kernel_specs() -> list[tuple[str, Any, dict[str, str], dict[str, Any], torch.dtype, int]]:
    """(name, kernel, signature, constexprs, dtype, num_warps) for every configuration to compile.

    Sizes are i32 and strides i64 (a stride past 2^31 elements is the case that matters).
    """
    from sspo_kernels.ops.segment.triton import SEGMENT_BLOCK_T, SEGMENT_NUM_WARPS, segment_sum_kernel
    from sspo_kernels.ops.vocab.triton import logprob_entropy_bwd_kernel, logprob_entropy_fwd_kernel

    sizes = {"row_start": "i32", "V": "i32", "T": "i32", "stride_b": "i64", "stride_t": "i64"}
    specs = []
    for dtype in DTYPES:
        logits = "*" + _TRITON_TYPE[dtype]
        # TRANSFORM=0 on every block the heuristic picks; the logit transform (a scale and a soft-cap,
        # TRANSFORM=2) on every block `transform_block_config` makes of them
        configs = all_vocab_block_configs(dtype)
        jobs = [(c, 0) for c in configs] + [(c, 2) for c in sorted({transform_block_config(c) for c in configs})]
        for (block_v, num_warps), transform in jobs:
            transforms = (transform,)
            fwd = {
                "logits_ptr": logits,
                "tokens_ptr": "*i64",
                "mask_ptr": "*i1",
                **{p: "*fp32" for p in ("logp_ptr", "entropy_ptr", "lse_ptr")},
                **sizes,
                "inv_tau": "fp32",
                "scale": "fp32",
                "softcap": "fp32",
            }
            for transform in transforms:
                constexprs = {"BLOCK_V": block_v, "TRANSFORM": transform}
                specs.append(("logprob_entropy_fwd", logprob_entropy_fwd_kernel, fwd, constexprs, dtype, num_warps))
            bwd = {
                "logits_ptr": logits,
                "tokens_ptr": "*i64",
                "mask_ptr": "*i1",
                **{p: "*fp32" for p in ("lse_ptr", "logp_ptr", "entropy_ptr", "grad_logp_ptr", "grad_entropy_ptr")},
                "grad_logits_ptr": logits,
                **sizes,
                "stride_gb": "i64",
                "stride_gt": "i64",
                "inv_tau": "fp32",
                "scale": "fp32",
                "softcap": "fp32",
            }
            for has_grad_entropy, transform in itertools.product((True, False), transforms):
                constexprs = {"BLOCK_V": block_v, "HAS_GRAD_ENTROPY": has_grad_entropy, "TRANSFORM": transform}
                specs.append(("logprob_entropy_bwd", logprob_entropy_bwd_kernel, bwd, constexprs, dtype, num_warps))
    # the deterministic segmented sum of the segment step: K = 3 columns in forward, 1 in backward
    seg_sum = {
        "values_ptr": "*fp32",
        **{p: "*i64" for p in ("seg_ptr", "start_ptr", "end_ptr")},
        "out_ptr": "*fp32",
        "K": "i32",
        "stride_v": "i32",
    }
    for block_k in (1, 4):
        constexprs = {"BLOCK_T": SEGMENT_BLOCK_T, "BLOCK_K": block_k}
        specs.append(("segment_sum", segment_sum_kernel, seg_sum, constexprs, torch.float32, SEGMENT_NUM_WARPS))
    specs += _segment_step_specs()
    return specs


def _segment_step_specs() -> list[tuple[str, Any, dict[str, str], dict[str, Any], torch.dtype, int]]:
    """The fused segment step: every granularity and scalar aggregation mode, every objective, every
    option on at once (packed, KL, dual clip, normaliser, tensor entropy_ref, entropy bonus, policy
    weights, rollout weights at each level, the off-policy and entropy masks, ratio-weighted KL), and
    the token-form ratio gradient on-policy with per-token advantages and a fixed entropy reference."""
    from sspo_kernels.ops.objective_triton import AGG_IDS, STEP_NUM_WARPS, segment_step_fwd_kernel, step_block_t
    from sspo_kernels.ops.objectives_triton import OBJECTIVE_IDS

    pointers = {
        **{p: "*fp32" for p in ("logp_ptr", "entropy_ptr", "old_ptr", "adv_ptr", "ref_ptr")},
        "mask_ptr": "*i1", "tokens_ptr": "*i64", "boundary_ptr": "*i1", "given_ptr": "*i64", "cu_ptr": "*i64",
        "norm_ptr": "*fp32", "h_ref_ptr": "*fp32", "weights_ptr": "*fp32", "rollout_ptr": "*fp32",
        "sorted_ptr": "*fp32", "count_ptr": "*i32", "iws_ptr": "*i32",
        **{p: "*fp32" for p in ("fws_ptr", "grad_logp_ptr", "grad_entropy_ptr", "out_ptr")},
        "nseg_ptr": "*i64",
    }  # fmt: skip
    scalars = (
        "clamp_c", "eps_low", "eps_high", "gamma", "k_min", "k_max", "h_ref_num", "dual_clip", "beta", "ent_coef",
        "norm_len", "is_min", "is_max", "off_delta", "ent_q", "tau_pos", "tau_neg", "k_pos", "lam_pos", "k_neg",
        "lam_neg",
    )  # fmt: skip
    signature = {**pointers, **dict.fromkeys(("N", "T", "B", "V", "M"), "i32"), **dict.fromkeys(scalars, "fp32")}
    default = dict(
        GRANULARITY=2, AGG=0, RATIO_EXACT=True, ON_POLICY=False, ADV_PER_RESPONSE=True, CHECK_TOKENS=True,
        PACKED=False, HAS_KL=False, HAS_DUAL=False,
        HAS_NORMALIZER=False, ENTROPY_REF=0, ADAPTS=True, ADAPT_LOW=True, ADAPT_HIGH=True, HAS_ENT_COEF=False,
        OBJECTIVE=0, POLICY_WEIGHTS=0, ROLLOUT=0, IS_MASK=True, OFF_POLICY=False, OFF_ROLLOUT=False, ENT_MASK=0,
        KL_RATIO=False,
    )  # fmt: skip
    everything = dict(PACKED=True, HAS_KL=True, HAS_DUAL=True, HAS_NORMALIZER=True, ENTROPY_REF=2, HAS_ENT_COEF=True)
    corrections = dict(POLICY_WEIGHTS=1, OFF_POLICY=True, OFF_ROLLOUT=True, ENT_MASK=1, KL_RATIO=True)
    aggs = AGG_IDS  # each granularity and each aggregation mode at least once
    variants = [dict(GRANULARITY=0, AGG=aggs["sum"]), dict(GRANULARITY=1, AGG=aggs["seq-mean-token-mean"])]
    variants += [dict(GRANULARITY=2), dict(GRANULARITY=3, AGG=aggs["seq-mean-token-sum"])]
    variants += [dict(everything, AGG=aggs["seq-mean-token-sum-norm"]), dict(everything, GRANULARITY=3)]
    variants += [dict(RATIO_EXACT=False, ON_POLICY=True, ENTROPY_REF=1, GRANULARITY=1, ADV_PER_RESPONSE=False)]
    # every rollout level with every other correction, and every objective with all of them (vespo: token level)
    variants += [{**everything, **corrections, "ROLLOUT": level, "IS_MASK": level != 2} for level in (1, 2, 3)]
    for name, objective in OBJECTIVE_IDS.items():
        if name != "clip":
            rollout = 1 if name == "vespo" else 3
            bounded = name in ("cispo", "gmpo")
            variants.append(
                {**everything, **corrections, "HAS_DUAL": False, "OBJECTIVE": objective, "ROLLOUT": rollout,
                 "ADAPTS": bounded, "POLICY_WEIGHTS": 2, "ENT_MASK": 2}
            )  # fmt: skip
    kernel = segment_step_fwd_kernel
    constexprs = [{**default, **v} for v in variants]
    return [
        ("segment_step", kernel, signature, {**c, "BLOCK_T": step_block_t(c)}, torch.float32, STEP_NUM_WARPS)
        for c in constexprs
    ]


def _jit_function(kernel: Any) -> Any:
    """The compilable JITFunction behind a kernel, also when it was built under TRITON_INTERPRET=1."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _compile(
    kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], cc: int, num_warps: int, align: int
) -> Any:
    """triton.compile for one target. align=16: pointers, V and strides marked 16-divisible, as the JIT
    specialises them for the usual vocabulary sizes (vectorised loads); align=1: only the pointers
    (an odd vocabulary size or row stride: scalar loads, more address registers)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    aligned = [a for a, ty in signature.items() if ty.startswith("*") or (align == 16 and a in _ALIGNED_INTS)]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(
        fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs, attrs=attrs
    )
    options = {"num_warps": num_warps, "num_stages": NUM_STAGES}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def _ptxas_usage(ptx: str, cc: int, fp_fusion: bool) -> dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [
            get_ptxas(cc).path,
            "-lineinfo",
            *([] if fp_fusion else ["--fmad=false"]),
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(cc)}",
            path,
            "-o",
            os.path.join(tmp, "kernel.cubin"),
        ]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    usage = {}
    for key, pattern in _PTXAS_LOG.items():
        found = re.search(pattern, log)
        usage[key] = int(found.group(1)) if found else 0
    return usage


@contextlib.contextmanager
def _compile_env() -> Iterator[None]:
    """A private Triton cache, fp fusion set explicitly, the interpreter off; restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DEFAULT_FP_FUSION", "TRITON_INTERPRET")}
    with tempfile.TemporaryDirectory(prefix="sspo-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        # unset, Triton 3.9 warns and fusion flips from on to off in 3.10; it changes registers
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        os.environ.pop("TRITON_INTERPRET", None)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _compile_job(job: tuple[int, int, int]) -> dict[str, Any]:
    """Compile one (configuration, target, alignment) and measure it; a compile error is part of the row."""
    index, cc, align = job
    name, kernel, signature, constexprs, dtype, num_warps = _kernel_specs()[index]
    variant = ",".join(f"{k}={int(v)}" for k, v in constexprs.items() if not k.startswith("BLOCK_")) or "-"
    row: dict[str, Any] = {
        "kernel": name,
        "dtype": _TRITON_TYPE[dtype],
        "block_v": "x".join(str(v) for k, v in constexprs.items() if k.startswith("BLOCK_")),
        "num_warps": num_warps,
        "variant": variant,
        "align": align,
        "target": f"sm_{cc}",
        "error": None,
    }
    start = time.perf_counter()
    try:
        compiled = _compile(kernel, signature, constexprs, cc, num_warps, align)
        usage = _ptxas_usage(compiled.asm["ptx"], cc, compiled.metadata.enable_fp_fusion)
        row.update(usage, shared=compiled.metadata.shared)
    except Exception as exc:  # reported in the table, and the run exits non-zero
        row.update(dict.fromkeys((*_PTXAS_LOG, "shared")), error=f"{type(exc).__name__}: {exc}")
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def aot_report(targets: tuple[int, ...] = TARGETS, workers: int | None = None) -> list[dict[str, Any]]:
    """Compile every configuration for each target and alignment; one row per compile.

    A row has kernel, dtype, block_v, num_warps, variant (the boolean constexprs), align (16 or 1, see
    `_compile`), target, regs, spill_stores, spill_loads, stack (bytes), shared (dynamic shared memory,
    bytes), compile_s and error (None, or the message of a failed compile; the counts are then None).
    workers: compiling processes (default: the CPU count, at most 8); 1 compiles in this process.
    """
    # the step kernel's only alignable integer, V, bounds a table lookup: one alignment is enough there
    names = [spec[0] for spec in _kernel_specs()]
    jobs = [
        (i, cc, align)
        for i, name in enumerate(names)
        for align in (ALIGNMENTS if name != "segment_step" else ALIGNMENTS[:1])
        for cc in targets
    ]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    with _compile_env():
        if workers <= 1:
            return [_compile_job(job) for job in jobs]
        # spawn: the workers import the kernels afresh, with the interpreter switched off
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            return list(pool.map(_compile_job, jobs, chunksize=4))


def row_failed(row: dict[str, Any]) -> bool:
    """A compile error or any spilled byte."""
    return row["error"] is not None or row["spill_stores"] > 0 or row["spill_loads"] > 0


def format_report(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table, then one line per compile error."""
    table = [[str(row[c]) for c in REPORT_COLUMNS] + ["FAIL" if row_failed(row) else "ok"] for row in rows]
    header = [*REPORT_COLUMNS, "status"]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
    for r in rows:
        if r["error"]:
            config = f"{r['dtype']} {r['block_v']}/{r['num_warps']} {r['variant']} align={r['align']} {r['target']}"
            lines.append(f"error in {r['kernel']} {config}: {r['error']}")
    return "\n".join(lines)


def main() -> int:
    start = time.perf_counter()
    rows = aot_report()
    print(format_report(rows))
    failed = sum(row_failed(r) for r in rows)
    print(f"{len(rows)} compiles in {time.perf_counter() - start:.1f} s; {failed} failed (compile error or spill)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
