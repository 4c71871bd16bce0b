"""`python -m examples.toy_rl [options]`: run the demo (see run.py)."""

from examples.toy_rl.run import main

main()
