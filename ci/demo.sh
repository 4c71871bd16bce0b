#!/usr/bin/env bash
# See the mechanism: GRPO (token), GSPO (sequence) and SSPO (subsentence) from one shared warm-up on a
# toy sorting task (a few minutes on a 2-core CPU). Prints a progress line per method and a table, and
# writes examples/out/toy_rl.json and examples/out/toy_rl.png. Extra args go to `python -m examples.toy_rl`.
# `bash ci/demo.sh --tournament`: every objective of the package at its granularities, 5 seeds, the default
# and a more off-policy setting (under 45 minutes on 2 cores); writes examples/out/tournament.{json,md,png}.
# A quick look: `bash ci/demo.sh --tournament --seeds 0 1 --iterations 8`.
. "$(dirname "$0")/_env.sh"
python -m examples.toy_rl "$@"
