"""A CPU-sized RL run that shows what GRPO (token), GSPO (sequence) and SSPO (subsentence) clip, and a
tournament of every objective of the package over seeds.

task.py: the sorting task and its reward; policy.py: the GRU policy and its warm-up; methods.py: the
objectives at their granularities; train.py: the RL loop on `sspo_loss_from_hidden`; measure.py: the
loop's own measurements; report.py: table, JSON, PNG; run.py: the command line (`python -m
examples.toy_rl`, `bash ci/demo.sh`); tournament.py, tournament_report.py and stats.py: the tournament
(`bash ci/demo.sh --tournament`) and its intervals.
"""
