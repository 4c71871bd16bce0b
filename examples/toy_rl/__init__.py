"""A CPU-sized RL run that shows what GRPO (token), GSPO (sequence) and SSPO (subsentence) clip.

task.py: the sorting task and its reward; policy.py: the GRU policy and its warm-up; train.py: the
RL loop on `sspo_loss_from_hidden`; measure.py: the loop's own measurements; report.py: table,
JSON, PNG; run.py: the command line (`python -m examples.toy_rl`, `bash ci/demo.sh`).
"""
