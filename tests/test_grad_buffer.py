"""The logits' gradient buffer the torch backend keeps between CPU calls (sspo_kernels/_utils.py).

It is handed out again only once nothing references it: a gradient the caller still holds, in any
form, is never written by a later call, and every call's gradient equals the one from a fresh buffer.
"""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close
from _cases import make_batch

from sspo_kernels import empty_cache, sspo_loss
from sspo_kernels._utils import _KEPT

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int, lengths=(7, 11, 4)):
    batch = make_batch(seed, list(lengths), seq_len=11, vocab=301, hole_p=0.2)
    args, kwargs = batch.inputs("subsentence", logits=batch.logits.detach().float().requires_grad_(True))
    return args, kwargs


def _grad(args, kwargs) -> torch.Tensor:
    out = sspo_loss(*args, backend="torch", **kwargs)
    return torch.autograd.grad(out.loss, args[0])[0]


def _fresh_grad(args, kwargs) -> torch.Tensor:
    empty_cache()
    return _grad(args, kwargs)


def test_dropped_gradient_is_reused_and_recomputed_exactly():
    args, kwargs = _batch(0)
    want = _fresh_grad(args, kwargs).clone()
    empty_cache()
    first = _grad(args, kwargs)
    ptr = first.data_ptr()
    del first
    # the allocator would hand a freed block of this size to the next allocation: this one takes it
    filler = torch.empty_like(want)
    again = _grad(args, kwargs)
    assert again.data_ptr() == ptr != filler.data_ptr(), "a gradient nobody holds should be handed out again"
    assert_close("dlogits (reused buffer)", again, want)


# every way a caller can keep the previous gradient alive
HOLDERS = {
    "tensor": lambda g: g,
    "view": lambda g: g[1:, 2:],
    "numpy": lambda g: g.numpy(),
    "list-of-rows": lambda g: list(g.unbind(0)),
}


@pytest.mark.parametrize("holder", HOLDERS.values(), ids=HOLDERS.keys())
def test_held_gradient_is_never_written(holder):
    args, kwargs = _batch(1)
    other_args, other_kwargs = _batch(2)
    empty_cache()
    grad = _grad(args, kwargs)
    before = grad.clone()
    kept = holder(grad)
    del grad
    second = _grad(other_args, other_kwargs)
    view = torch.as_tensor(kept) if not isinstance(kept, list) else torch.stack(kept)
    assert_close("held dlogits", view, before[1:, 2:] if view.shape != before.shape else before)
    assert_close("dlogits (second call)", second, _fresh_grad(other_args, other_kwargs))


def test_leaf_backward_steals_the_buffer_and_accumulates():
    """`.backward()` on leaf logits keeps the returned buffer as `.grad` (no clone); a second call
    then takes a new buffer and autograd adds it into `.grad`."""
    args, kwargs = _batch(3)
    want = _fresh_grad(args, kwargs).clone()
    empty_cache()
    logits = args[0]
    sspo_loss(*args, backend="torch", **kwargs).loss.backward()
    (kept,) = (t for t, _ in _KEPT.values())
    assert logits.grad.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr()
    sspo_loss(*args, backend="torch", **kwargs).loss.backward()
    assert_close("accumulated .grad", logits.grad, 2 * want, rtol=1e-6)


def test_smaller_call_uses_part_of_a_larger_buffer():
    big_args, big_kwargs = _batch(4, lengths=(11, 11, 11))
    small_args, small_kwargs = _batch(5, lengths=(3, 5))
    want = _fresh_grad(small_args, small_kwargs).clone()
    empty_cache()
    big = _grad(big_args, big_kwargs)
    ptr = big.data_ptr()
    del big
    small = _grad(small_args, small_kwargs)
    assert small.data_ptr() == ptr and small.is_contiguous()
    assert_close("dlogits (part of a larger buffer)", small, want)


def test_empty_cache_releases_and_dtypes_keep_their_own():
    args, kwargs = _batch(6)
    empty_cache()
    del_me = _grad(args, kwargs)
    half_logits = args[0].detach().bfloat16().requires_grad_(True)
    half = _grad((half_logits, *args[1:]), kwargs)
    assert {dtype for _, dtype in _KEPT} == {torch.float32, torch.bfloat16}
    del del_me, half
    empty_cache()
    assert not _KEPT
