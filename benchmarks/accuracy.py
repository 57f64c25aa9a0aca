"""Accuracy / density harness: synthetic long-context tasks and a natural-text document, run
through the minference backend in several modes (dense, default, searched, extra configs).

    python3 -m benchmarks.accuracy --lengths 4096 --examples 2 --modes dense,default,searched \
        --out benchmarks/results/accuracy_cpu_4k.json                      # SmolLM2 (the default model)
    python3 -m benchmarks.accuracy --model qwen2.5-coder-1.5b --device cuda --lengths 16384,32768,65536,131072 \
        --examples 20 --order example --no-inductor --budget-s 480 --out $OUT/acc_qwen.json

Prints a per-task / per-length table and writes the JSON report (plus one JSON line per scored
example in <out>.rows.jsonl) and a density/accuracy PNG. See mi_compile/eval/harness.py for what
is measured and how, and benchmarks/README.md for the GPU commands.
"""
from mi_compile.eval.harness import main

if __name__ == "__main__":
    main()
