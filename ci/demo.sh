#!/usr/bin/env bash
# See the mechanism: GRPO (token), GSPO (sequence) and SSPO (subsentence) from one shared warm-up on a
# toy sorting task (a few minutes on a 2-core CPU). Prints a progress line per method and a table, and
# writes examples/out/toy_rl.json and examples/out/toy_rl.png. Extra args go to `python -m examples.toy_rl`.
. "$(dirname "$0")/_env.sh"
python -m examples.toy_rl "$@"
