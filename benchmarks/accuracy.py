"""Accuracy / density harness: synthetic long-context tasks and a natural-text document, run
through the minference backend in several modes (dense, default, searched, extra configs).

    python benchmarks/accuracy.py --lengths 4096 --examples 2 --modes dense,default,searched \
        --out benchmarks/results/accuracy_cpu_4k.json

Prints a per-task / per-length table and writes the JSON report and a density/accuracy PNG.
See mi_compile/eval/harness.py for what is measured and how.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mi_compile.eval.harness import main  # noqa: E402

if __name__ == "__main__":
    main()
