#!/usr/bin/env bash
# The whole test suite on a machine without a GPU: lint, then pytest (Triton kernels run in the
# interpreter; the AOT compile check for sm_80 / sm_90 is one of the tests). Extra args go to pytest.
. "$(dirname "$0")/_env.sh"
ruff check .
ruff format --check .
python -m pytest tests/ -q -p no:cacheprovider "$@"
