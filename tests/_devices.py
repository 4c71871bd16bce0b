"""The device dimension of the comparison tests: every case on the CPU, a curated subset on CUDA.

`grid(...)` is one `pytest.mark.parametrize` over `device` and the product of the given axes: every
combination with `device="cpu"` (the Triton kernels run in the interpreter), and with
`device="cuda"`, marked `gpu`, the combinations its `cuda` predicate accepts. Each new constexpr
combination of a kernel costs a compile of 0.3-3 s on the first CUDA call, so the CUDA subset covers
every dtype, layout, granularity, aggregation mode and kernel variant once rather than their
product. On a machine without CUDA the `gpu` cases are collected and skipped (conftest), so
`pytest --collect-only -m gpu tests/` lists them.

    @grid(("backend", BACKENDS), ("dtype", DTYPES), cuda=lambda p: p.backend == "triton")
    def test_x(device, backend, dtype): ...

An axis is (argnames, values): values a list (plain values or `pytest.param`s, whose marks and id
are kept) or a dict {id: value}; argnames "n,v" takes tuples. The predicate gets one object whose
attributes are the argnames.

`TRITON` marks a test (or a `pytest.param`) that runs Triton kernels on its device: on a CUDA
machine the interpreter is off, so its CPU cases skip with the reason (conftest).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from types import SimpleNamespace

import pytest
import torch

GPU = pytest.mark.gpu
TRITON = pytest.mark.triton
CUDA = pytest.param("cuda", marks=GPU, id="cuda")
DEVICES = ["cpu", CUDA]
TRITON_BACKEND = pytest.param("triton", marks=TRITON, id="triton")
BACKENDS = ["torch", TRITON_BACKEND]
ParameterSet = type(CUDA)  # what pytest.param returns


def _auto_id(name: str, value: object, index: int) -> str:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return str(value)
    return f"{name}{index}"


def _axis(names: str, values: Iterable | dict) -> list[tuple[object, tuple, str]]:
    """[(value, marks, id)] of one axis."""
    items = values.items() if isinstance(values, dict) else ((None, v) for v in values)
    out = []
    for index, (given_id, value) in enumerate(items):
        marks: tuple = ()
        if isinstance(value, ParameterSet):
            given_id = value.id if value.id is not None else given_id
            marks = tuple(value.marks)
            value = value.values[0] if "," not in names else value.values
        if given_id is None:
            parts = value if "," in names else (value,)
            given_id = "-".join(_auto_id(n.strip(), v, index) for n, v in zip(names.split(","), parts))
        out.append((value, marks, str(given_id)))
    return out


def _accepts(cuda: Callable[[SimpleNamespace], bool] | bool, params: dict) -> bool:
    return cuda if isinstance(cuda, bool) else bool(cuda(SimpleNamespace(**params)))


def grid(*axes: tuple[str, Iterable | dict], cuda: Callable[[SimpleNamespace], bool] | bool = True):
    """parametrize ("device", *argnames) over every combination of `axes` on the CPU, and on CUDA
    (marked gpu) over those `cuda` accepts (True: all, False: none)."""
    names = [n.strip() for names, _ in axes for n in names.split(",")]
    expanded = [_axis(names_, values) for names_, values in axes]
    params = []
    for device in ("cpu", "cuda"):
        for combo in itertools.product(*expanded):
            flat: list = []
            for (axis_names, _), (value, _, _) in zip(axes, combo):
                flat.extend(value if "," in axis_names else (value,))
            if device == "cuda" and not _accepts(cuda, dict(zip(names, flat))):
                continue
            marks = [mark for _, axis_marks, _ in combo for mark in axis_marks] + ([GPU] if device == "cuda" else [])
            ids = "-".join([device, *(i for _, _, i in combo)])
            params.append(pytest.param(device, *flat, marks=marks, id=ids))
    return pytest.mark.parametrize(["device", *names], params)


def on(device: str, *values):
    """The values with every tensor moved to `device` (anything else passes through)."""
    return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


def on_dict(device: str, values: dict) -> dict:
    """The dict with every tensor value moved to `device`."""
    return dict(zip(values, on(device, *values.values())))
