"""Accuracy / density harness: synthetic long-context tasks and a natural-text document, run
through the minference backend in several modes (dense, default, searched, extra configs).

    python benchmarks/accuracy.py --lengths 4096 --examples 2 --modes dense,default,searched \
        --out benchmarks/results/accuracy_cpu_4k.json                      # SmolLM2 (the default model)
    python benchmarks/accuracy.py --model qwen2.5-coder-1.5b --device cuda --lengths 16384,32768,65536,131072 \
        --examples 20 --order example --no-inductor --budget-s 480 --out $OUT/acc_qwen.json

Prints a per-task / per-length table and writes the JSON report (plus one JSON line per scored
example in <out>.rows.jsonl) and a density/accuracy PNG. See mi_compile/eval/harness.py for what
is measured and how, and benchmarks/README.md for the GPU commands.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mi_compile.eval.harness import main  # noqa: E402

if __name__ == "__main__":
    main()
