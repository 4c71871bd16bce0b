"""What the benchmark measures: cases (shapes), their inputs, and the paths (implementations).

A `Case` is one problem size: N tokens (as a padded `(B, T)` batch), vocabulary V, the logits
dtype, the granularity, and for the paths that start from hidden states the hidden size H. A `Path`
turns a case's `Inputs` into a closure that returns the scalar loss; the runner times it, takes
gradients with `torch.autograd.grad` (as when the logits come out of an `lm_head`: no `.grad`
accumulation) and compares the result with the path named in `Path.baseline`.

Optional paths (Triton, fused linear, Liger-Kernel) import their module only when asked whether
they can run, so a missing module or device skips them with a reason instead of failing.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.baseline import baseline_loss_from_hidden, baseline_sspo_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Share of vocabulary ids that end a subsentence: mean segments of about 20 tokens, as in prose.
BOUNDARY_SHARE = 0.05
# The fp64 reference walks segments in Python: only run it up to this many logits.
REFERENCE_MAX_ELEMENTS = 1 << 21
# Scale of the per-response and per-token offsets between new and old log-probs: comparable to the
# subsentence clip widths (about 1e-2), so some segments are clipped and some are not.
LOG_RATIO_SCALE = 0.01


@dataclass(frozen=True)
class Case:
    """One problem size. `hidden` set means the paths start from hidden states `(N, H)` and a `(V, H)` weight.

    `packed`: the N tokens are one `(N,)` batch of whole responses with `cu_seqlens`, no padding."""

    n: int
    v: int
    dtype: str = "fp32"
    granularity: str = "subsentence"
    hidden: int | None = None
    packed: bool = False

    @property
    def kind(self) -> str:
        return "logits" if self.hidden is None else "hidden"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def logits_bytes(self) -> int:
        return self.n * self.v * self.element_size

    @property
    def label(self) -> str:
        h = "" if self.hidden is None else f" H={self.hidden}"
        return f"N={self.n}{h} V={self.v} {self.dtype} {self.granularity}{' packed' if self.packed else ''}"

    @property
    def seq_len(self) -> int:
        """T of the padded batch: 512-token responses when N allows, else one response."""
        return 512 if self.n % 512 == 0 else self.n


@dataclass
class Inputs:
    """One case's tensors. `logits` (B, T, V) for logits cases; `hidden` (B, T, H) and `weight` (V, H) otherwise.

    Packed cases drop the T dimension: (N, V), (N, H), (N,) token tensors, and `cu_seqlens` (B + 1,)."""

    case: Case
    tokens: torch.Tensor  # (B, T) int64, -100 at padding
    old_logprobs: torch.Tensor  # (B, T) fp32
    advantages: torch.Tensor  # (B,) fp32
    mask: torch.Tensor  # (B, T) bool
    boundary: torch.Tensor  # (V,) bool
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    @property
    def differentiable(self) -> list[torch.Tensor]:
        """The tensors gradients are taken with respect to."""
        return [self.logits] if self.logits is not None else [self.hidden, self.weight]

    def options(self) -> dict:
        """Keyword arguments shared by every path."""
        opts: dict = {"granularity": self.case.granularity}
        if self.case.granularity in ("subsentence", "sentence"):
            opts["boundary"] = self.boundary
        if self.cu_seqlens is not None:
            opts["cu_seqlens"] = self.cu_seqlens
        return opts


def make_inputs(case: Case, device: str | torch.device, seed: int = 0) -> Inputs:
    """Random inputs of `case` on `device`: logits ~ 2 * N(0, 1), responses of 3/4 to all of T tokens.

    old_logprobs are the true log-probs of the sampled tokens shifted by small per-response and
    per-token offsets, so ratios sit near 1 and near the clip bounds, as in on-policy training.
    A packed case concatenates the same responses without padding; the last one is lengthened to
    fill N tokens.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = case.torch_dtype
    t = case.seq_len
    b = case.n // t
    lengths = torch.randint(3 * t // 4, t + 1, (b,), generator=gen, device=device)
    cu_seqlens = None
    if case.packed:
        lengths[-1] += case.n - lengths.sum()
        cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        # one response per "row": the loops below then slice the flat tensors by cu_seqlens
        b, t, inside = 1, case.n, torch.ones(1, case.n, dtype=torch.bool, device=device)
    else:
        inside = torch.arange(t, device=device)[None, :] < lengths[:, None]
    tokens = torch.randint(0, case.v, (b, t), generator=gen, device=device)
    tokens = torch.where(inside, tokens, -100)
    boundary = torch.rand(case.v, generator=gen, device=device) < BOUNDARY_SHARE

    logits = hidden = weight = None
    if case.hidden is None:
        logits = (2 * torch.randn(b, t, case.v, generator=gen, device=device, dtype=dtype)).requires_grad_(True)
    else:
        h = case.hidden
        hidden = torch.randn(b, t, h, generator=gen, device=device, dtype=dtype).requires_grad_(True)
        weight = (torch.randn(case.v, h, generator=gen, device=device, dtype=dtype) * (2 / h**0.5)).requires_grad_(True)

    with torch.no_grad():
        true_logp = torch.empty(b, t, device=device)
        for i in range(b):  # one response at a time keeps the fp32 temporaries small
            z = logits[i] if logits is not None else hidden[i] @ weight.T
            lp = torch.log_softmax(z.float(), -1)
            true_logp[i] = lp.gather(-1, tokens[i].clamp(min=0)[:, None])[:, 0]
        responses = lengths.numel()
        offset = LOG_RATIO_SCALE * torch.randn(responses, 1, generator=gen, device=device)
        if case.packed:
            offset = offset.repeat_interleave(lengths, 0).reshape(1, t)
        noise = LOG_RATIO_SCALE * torch.randn(b, t, generator=gen, device=device)
        old_logprobs = torch.where(inside, true_logp - offset - noise, 0.0)
    advantages = torch.randn(responses, generator=gen, device=device)
    if case.packed:
        tokens, old_logprobs, inside = tokens[0], old_logprobs[0], inside[0]
        if logits is not None:
            logits = logits.detach()[0].requires_grad_(True)
        else:
            hidden = hidden.detach()[0].requires_grad_(True)
    return Inputs(case, tokens, old_logprobs, advantages, inside, boundary, logits, hidden, weight, cu_seqlens)


@dataclass(frozen=True)
class Path:
    """One implementation being measured.

    build(inputs) returns a closure computing the scalar loss from `inputs` (its differentiable
    tensors are `inputs.differentiable`). unavailable(inputs) returns None when the path can run,
    else the reason it is skipped. `overwrites_input`: the backward writes into the logits buffer,
    so the runner restores the logits before every call.
    """

    name: str
    kind: str  # "logits" or "hidden"
    summary: str
    build: Callable[[Inputs], Callable[[], torch.Tensor]]
    baseline: str  # the path this one's ratios are taken against ("" for a baseline itself)
    unavailable: Callable[[Inputs], str | None] = lambda inputs: None
    overwrites_input: bool = False
    default: bool = True


@functools.cache
def _module(name: str):
    """The module, or the ImportError raised importing it (cached either way)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        return exc


def _missing(name: str) -> str | None:
    mod = _module(name)
    return f"{name} not importable ({mod})" if isinstance(mod, ImportError) else None


# ---------------------------------------------------------------- logits paths


def _baseline(inp: Inputs):
    return lambda: baseline_sspo_loss(
        inp.logits, inp.tokens, inp.old_logprobs, inp.advantages, inp.mask, **inp.options()
    )[0]


@functools.cache
def _compiled_baseline():
    return torch.compile(baseline_sspo_loss, dynamic=False)


def _baseline_compile(inp: Inputs):
    fn = _compiled_baseline()
    return lambda: fn(inp.logits, inp.tokens, inp.old_logprobs, inp.advantages, inp.mask, **inp.options())[0]


def _reference(inp: Inputs):
    reference = importlib.import_module("reference")
    return lambda: (
        reference.sspo_loss(inp.logits, inp.tokens, inp.old_logprobs, inp.advantages, inp.mask, **inp.options()).loss
    )


def _reference_unavailable(inp: Inputs) -> str | None:
    if inp.case.n * inp.case.v > REFERENCE_MAX_ELEMENTS:
        return f"fp64 reference only up to N*V = {REFERENCE_MAX_ELEMENTS}"
    return None


def _sspo(backend: str, inplace: bool, **extra):
    def build(inp: Inputs):
        from sspo_kernels import sspo_loss

        args = (inp.logits, inp.tokens, inp.old_logprobs, inp.advantages, inp.mask)
        return lambda: sspo_loss(*args, backend=backend, inplace_backward=inplace, **extra, **inp.options()).loss

    return build


def _triton_unavailable(inp: Inputs) -> str | None:
    if inp.tokens.device.type != "cuda":
        return "needs CUDA (the CPU interpreter is for tests, not timing)"
    return _missing("triton")


# ---------------------------------------------------------------- hidden-state paths


def _baseline_linear(inp: Inputs):
    args = (inp.hidden, inp.weight, inp.tokens, inp.old_logprobs, inp.advantages, inp.mask)
    return lambda: baseline_loss_from_hidden(*args, **inp.options())[0]


def _fused_linear(inp: Inputs):
    from sspo_kernels import sspo_loss_from_hidden

    args = (inp.hidden, inp.weight, inp.tokens, inp.old_logprobs, inp.advantages, inp.mask)
    return lambda: sspo_loss_from_hidden(*args, **inp.options()).loss


def _lmhead_then_loss(inp: Inputs):
    """The real case of `inplace_backward`: logits from a matmul are not a leaf, so the gradient buffer
    they hand back is the logits' own and autograd does not copy it into a `.grad`."""
    from sspo_kernels import sspo_loss

    def run():
        logits = inp.hidden @ inp.weight.T
        args = (logits, inp.tokens, inp.old_logprobs, inp.advantages, inp.mask)
        return sspo_loss(*args, backend="torch", inplace_backward=True, **inp.options()).loss

    return run


# ---------------------------------------------------------------- registry

PATHS: dict[str, Path] = {
    p.name: p
    for p in (
        Path("baseline", "logits", "eager fp32: full log_softmax, gather, entropy, index_add", _baseline, ""),
        Path(
            "baseline-compile", "logits", "the baseline under torch.compile (slow first call)",
            _baseline_compile, "baseline", default=False,
        ),
        Path("reference", "logits", "reference.sspo_loss, fp64 oracle (small sizes)", _reference, "baseline",
             _reference_unavailable),
        Path("torch", "logits", 'sspo_loss(backend="torch"): chunked PyTorch', _sspo("torch", False), "baseline"),
        Path("torch-inplace", "logits", "torch backend, inplace_backward=True", _sspo("torch", True), "baseline",
             overwrites_input=True),
        Path("torch-compile", "logits", "torch backend, compile_chunks=True (slow first call)",
             _sspo("torch", False, compile_chunks=True), "baseline", default=False),
        Path("triton", "logits", 'sspo_loss(backend="triton")', _sspo("triton", False), "baseline",
             _triton_unavailable),
        Path("triton-inplace", "logits", "Triton backend, inplace_backward=True", _sspo("triton", True), "baseline",
             _triton_unavailable, overwrites_input=True),
        Path("baseline-linear", "hidden", "hidden @ W.T, then the eager baseline", _baseline_linear, ""),
        Path("fused-linear", "hidden", "sspo_loss_from_hidden: logits never materialised", _fused_linear,
             "baseline-linear"),
        Path("lmhead-inplace", "hidden", "logits = hidden @ W.T, then sspo_loss(inplace_backward=True)",
             _lmhead_then_loss, "baseline-linear", overwrites_input=False),
    )
}  # fmt: skip

DEFAULT_PATHS = tuple(name for name, p in PATHS.items() if p.default)


def baseline_of(kind: str) -> str:
    return "baseline" if kind == "logits" else "baseline-linear"


# ---------------------------------------------------------------- suites of cases

# On a 2-core CPU: about 1.5 minutes (2 with the AOT report). N sweep at V=32000, V sweep at N=256
# up to Qwen's 151,936, the headline (N=1024 packed), one bf16 case, and one case from hidden states
# (logits of 125 MiB, as at the headline).
DEFAULT_SUITE = (
    *(Case(n, 32000) for n in (256, 512, 1024)),
    Case(1024, 32000, packed=True),
    *(Case(256, v) for v in (8000, 65536, 151936)),
    Case(1024, 32000, "bf16"),
    Case(1024, 32000, hidden=256),
)
# A few seconds: the CI smoke run (two N, two V, bf16, from hidden states).
QUICK_SUITE = (
    Case(64, 512),
    Case(128, 512),
    Case(64, 1024),
    Case(64, 512, "bf16"),
    Case(64, 512, hidden=32),
)
# One GPU, a few minutes: the sizes of the issues (bf16, N = 8192, V = 151,936; fused linear with
# H = 4096), with N and V sweeps around them for the plots, and the fp32 headline shape.
GPU_SUITE = (
    *(Case(n, 151936, "bf16") for n in (2048, 4096, 8192)),
    *(Case(8192, v, "bf16") for v in (32000, 65536)),
    Case(8192, 151936, "bf16", "token"),
    Case(8192, 151936, "bf16", "sequence"),
    Case(1024, 32000, packed=True),
    Case(8192, 32000),
    Case(8192, 151936, "bf16", hidden=4096),
)
# The shape the summary line quotes: the default paths against the baseline at N=1024, V=32000 fp32,
# subsentence, one packed batch (the case of the CPU target: >= 3x the baseline's speed by default).
HEADLINE = Case(1024, 32000, packed=True)
SUITES = {"default": DEFAULT_SUITE, "quick": QUICK_SUITE, "gpu": GPU_SUITE}
