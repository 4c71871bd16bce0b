"""Adapters for the trainers people use. Import the one you need; each imports its library:

- `sspo_kernels.integrations.trl`: `SSPOGRPOTrainer` / `SSPOGRPOConfig` for TRL's GRPOTrainer (extra `trl`);
- `sspo_kernels.integrations.verl`: the `loss_mode="sspo"` policy loss for verl, loaded by verl itself through
  the `verl.plugins` entry point (extra `verl`).

This module imports neither library.
"""
