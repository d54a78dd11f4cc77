"""``python -m benchmarks``: issue 19's suite (benchmarks/run.py)."""
from benchmarks.run import main

main()
