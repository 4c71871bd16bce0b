"""Benchmarks of sspo_kernels: `python -m bench.run` (CPU or CUDA), `pytest bench/ --benchmark-only`,
and `bash bench/gpu_suite.sh OUTDIR` on a CUDA machine. See bench/README.md."""
