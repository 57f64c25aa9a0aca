"""Pictures of a per-head config (matplotlib, Agg backend: files only, no display).

* :func:`plot_config`: a layers x heads grid coloured by pattern kind (each pattern's
  ``color``); each cell shows the pattern's budget (its ``label``: A-shape ``sink+local``,
  vertical-slash ``V/S``, block-sparse ``kK``) and,
  when the search's report is given, the head's density (else its recall ``score``).
* :func:`plot_attention`: one head's dense causal attention (log scale) beside the mask its
  configured pattern selects on the same prompt (via :func:`mi_compile.sparse.selection_mask`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..patterns import registry


def colors() -> dict:
    """Pattern name -> plot colour, for every registered pattern."""
    return {spec.name: spec.color for spec in registry.specs()}


#: The colours of the patterns registered at import (:func:`colors` sees later ones too).
COLORS = colors()


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _budget_text(p) -> str:
    return registry.get(p.kind).label(p)


def plot_config(config, out, *, report=None, title: str | None = None) -> Path:
    """Draw ``config`` (path, dict or SparseConfig) to the PNG ``out``; returns its path."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from ..config import load_config, single_config

    cfg = single_config(load_config(config), "plot")
    num_layers = cfg.num_layers or (max(cfg.layers) + 1 if cfg.layers else 1)
    num_heads = cfg.num_heads or max((h + 1 for hs in cfg.layers.values() for h in hs), default=1)
    density = {}
    if report is not None:
        rep = json.loads(Path(report).read_text()) if not isinstance(report, dict) else report
        density = {(h["layer"], h["head"]): h["density"] for h in rep.get("heads", [])}
    palette = colors()
    kinds = list(palette)
    grid = torch.zeros(num_layers, num_heads, dtype=torch.long)
    texts = {}
    for layer in range(num_layers):
        heads = cfg.heads_for(layer, num_heads)
        for h, p in enumerate(heads):
            grid[layer, h] = kinds.index(p.kind)
            extra = density.get((layer, h))
            if extra is not None:
                second = f"d={extra:.2f}"
            else:
                score = cfg.scores.get(layer, {}).get(h)
                second = f"r={score:.2f}" if score is not None else ""
            texts[layer, h] = _budget_text(p) + ("\n" + second if second else "")

    plt = _pyplot()
    fig_w = max(5.0, 0.9 * num_heads + 2.5)
    fig_h = max(3.0, 0.42 * num_layers + 1.5)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(grid.numpy(), cmap=ListedColormap([palette[k] for k in kinds]), vmin=-0.5,
              vmax=len(kinds) - 0.5, aspect="auto", interpolation="nearest")
    fs = 6 if num_layers > 20 or num_heads > 12 else 8
    for (layer, h), t in texts.items():
        ax.text(h, layer, t, ha="center", va="center", fontsize=fs, color="white" if grid[layer, h] else "black")
    ax.set_xticks(range(num_heads))
    ax.set_yticks(range(num_layers))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    used = sorted(set(grid.flatten().tolist()))
    ax.legend(handles=[Patch(color=palette[kinds[i]], label=kinds[i]) for i in used],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if title is None:
        title = cfg.model or cfg.source
        import textwrap
        title = "\n".join(textwrap.wrap(title, 90))       # at spaces, not inside words
    ax.set_title(title, fontsize=8)
    return _save(fig, out)


def _save(fig, out) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_attention(model, input_ids, config, layer: int, head: int, out) -> Path:
    """Dense attention of (``layer``, ``head``) on ``input_ids`` beside its selected mask."""
    from matplotlib.colors import LogNorm

    from ..config import load_config, single_config
    from ..sparse import selection_density, selection_mask
    from .capture import capture_qk

    cfg = single_config(load_config(config), "plot")
    cap = capture_qk(model, input_ids)
    if layer not in cap.q:
        raise ValueError(f"layer {layer} was not captured (layers: {cap.layers})")
    q, k, scale = cap.q[layer], cap.k[layer], cap.scale[layer]
    B, Hq, n, D = q.shape
    if not 0 <= head < Hq:
        raise ValueError(f"head {head} out of range (0..{Hq - 1})")
    pattern = cfg.heads_for(layer, Hq)[head]
    kv = head // (Hq // k.shape[1])
    s = (q[0, head] @ k[0, kv].T) * scale
    s.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(s, -1)
    # the selection of this head alone (every head of the layer given the same pattern: the
    # data-dependent index of a head does not depend on the other heads' patterns)
    mask = selection_mask(q, k, [pattern] * Hq, scale=scale)[0, head]
    dens = float(selection_density(q, k, [pattern] * Hq, scale=scale)[0, head])
    recall = float((probs * mask).sum(-1).mean())

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    floor = 1e-6
    img = axes[0].imshow(probs.clamp(min=floor).numpy(), norm=LogNorm(vmin=floor, vmax=1.0),
                         cmap="magma", interpolation="nearest")
    fig.colorbar(img, ax=axes[0], fraction=0.046, pad=0.04)
    axes[0].set_title(f"layer {layer}, head {head}: dense attention (log), n={n}", fontsize=9)
    shown = torch.where(mask, probs.clamp(min=floor).log10(), torch.tensor(math.nan))
    axes[1].imshow(torch.ones(n, n).tril().numpy(), cmap="Greys", vmin=0, vmax=4, interpolation="nearest")
    axes[1].imshow(shown.numpy(), cmap="magma", vmin=math.log10(floor), vmax=0, interpolation="nearest")
    axes[1].set_title(f"{pattern.describe()}: selected pairs (grey: skipped)\n"
                      f"density {dens:.3f}, recall (all rows) {recall:.3f}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    return _save(fig, out)
