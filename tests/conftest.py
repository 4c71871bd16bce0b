"""Fixtures and markers shared by the tests.

The Triton kernels run on the CPU under the interpreter: TRITON_INTERPRET must be set before the
kernel modules are imported, so it is set here, before any test module imports sspo_kernels, unless
a CUDA device is present (then the real compiler runs them).

Markers: `gpu` cases skip without CUDA; `triton` cases (they run Triton kernels on their `device`
parameter, the CPU when they have none) skip on the CPU when the interpreter is off, i.e. on a CUDA
machine, where their `cuda` twins run instead (tests/_devices.py builds the pairs).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Fresh outputs allocated by the launchers are filled with NaN, so an element a kernel forgets to
# write fails the comparison instead of passing with whatever torch.empty returned.
os.environ.setdefault("SSPO_KERNELS_POISON", "1")

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "triton: runs Triton kernels on its device parameter (the CPU needs TRITON_INTERPRET=1)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_cpu_triton = pytest.mark.skip(
        reason="Triton kernels on CPU tensors need the interpreter, which is off on a CUDA machine "
        "(TRITON_INTERPRET is set only without CUDA); the cuda case runs them compiled"
    )
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        device = params.get("device", "cpu")
        # a backend / impl parameter "triton" without a device parameter runs Triton on CPU tensors too
        runs_triton = item.get_closest_marker("triton") is not None or "triton" in (
            params.get("backend"),
            params.get("impl"),
        )
        if runs_triton and device == "cpu" and not INTERPRETING:
            item.add_marker(skip_cpu_triton)


@pytest.fixture
def device() -> str:
    """Where the kernel tests run: CUDA when present, else the CPU (Triton interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: more threads only add fork/join cost, which
    explodes on a busy 2-core CI box. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
