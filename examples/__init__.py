"""Runnable examples of sspo_kernels (`python -m examples.toy_rl`)."""
