#!/usr/bin/env bash
# The main job: the benchmark on the default shapes (a few minutes on a 2-core CPU). It prints a
# table and writes CSV / JSON / PNG plots under bench/out/. Extra args go to `python -m bench.run`.
. "$(dirname "$0")/_env.sh"
python -m bench.run "$@"
