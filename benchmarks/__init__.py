"""The benchmarks a user or reviewer reruns, each ``python -m benchmarks.<name>`` from the
repository root (no install needed there): e2e, kernels, gpu_checks, ceilings, host_overhead,
compile_time, compile_variants, kernel_resources (no GPU needed), accuracy, and device_model
(the real model's transfer to the GPU machine). Commands and results: benchmarks/README.md and
docs/results.md."""
