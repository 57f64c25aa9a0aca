"""Tensor parallelism: which slice of a whole-model per-head config this rank's graph runs.

Under tensor parallelism (``from_pretrained(path, tp_plan="auto")`` under torchrun, or torch's
``parallelize_module`` with ``ColwiseParallel`` q/k/v and ``RowwiseParallel`` o_proj) rank ``r`` of
``T`` holds query heads ``[r*Hq/T, (r+1)*Hq/T)`` and KV heads ``[r*Hkv/T, (r+1)*Hkv/T)``; its SDPA
calls see only those (plain local tensors; the weights are DTensors sharded on the head
dimension). A per-head config is written for the whole model (layer L, global query head h), so
each rank must look up its own slice: unsliced, the head check fails ("config has 8 heads per
layer, the model has 4") or, for a config that does not pin ``num_heads``, every rank silently
runs rank 0's patterns.

How the backend learns the slice (:func:`resolve_tp`), the first that applies:

1. the backend option ``tp``: ``{"rank": r, "size": T}``, or ``False`` (no slicing: the config is
   already for the heads the graph shows);
2. the graph: parameters that are DTensors sharded over a device mesh (transformers' mesh has a
   ``"tp"`` dimension, torch's ``parallelize_module`` a 1-D mesh) give this rank's coordinate
   and the size of that dimension;
3. ``torch.distributed``, when initialised with world size ``W > 1`` and the config pins
   ``num_heads == local heads * W`` (a model sharded by hand into plain tensors): the default
   group's rank and world size.

Otherwise nothing is sliced (one process, or tensor-parallel size 1).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

log = logging.getLogger("mi_compile")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TPSlice:
    """Rank ``rank`` of a tensor-parallel group of ``size`` ranks; ``source`` says how it was learned."""

    rank: int
    size: int
    source: str = "option tp"

    def __post_init__(self):
        if not (_is_int(self.size) and self.size >= 1):
            raise ValueError(f"tensor-parallel size must be an int >= 1, got {self.size!r}")
        if not (_is_int(self.rank) and 0 <= self.rank < self.size):
            raise ValueError(f"tensor-parallel rank must be an int in 0..{self.size - 1} "
                             f"(size {self.size}), got {self.rank!r}")

    def head_range(self, local_heads: int) -> range:
        """The global indices of this rank's ``local_heads`` heads."""
        return range(self.rank * local_heads, (self.rank + 1) * local_heads)

    def describe(self, local_q: int | None = None, local_kv: int | None = None) -> str:
        """One line for the explain table: the rank and its head range."""
        text = f"tensor parallel: rank {self.rank} of {self.size} ({self.source})"
        parts = []
        for what, n in (("query", local_q), ("KV", local_kv)):
            if _is_int(n):
                r = self.head_range(n)
                parts.append(f"{what} heads {r.start}..{r.stop - 1} of {n * self.size}")
        return text + (": " + ", ".join(parts) if parts else "")


def slice_heads(heads: list, rank: int, size: int) -> list:
    """Rank ``rank``'s contiguous share of a layer's whole-model per-head list (``size`` ranks)."""
    tp = TPSlice(rank, size)
    if len(heads) % size:
        raise ValueError(f"{len(heads)} heads cannot be split over tensor-parallel size {size}")
    own = tp.head_range(len(heads) // size)
    return list(heads[own.start:own.stop])


def parse_tp_option(value: Any) -> "TPSlice | bool | None":
    """Validate the backend option ``tp``: None (detect), False (never slice), or
    ``{"rank": r, "size": T}`` (a :class:`TPSlice` is accepted as it is)."""
    from .options import OptionsError

    if value is None or value is False or isinstance(value, TPSlice):
        return value
    if not isinstance(value, dict) or set(value) != {"rank", "size"}:
        raise OptionsError(f"option 'tp' must be {{'rank': r, 'size': T}}, False or None, got {value!r}")
    try:
        return TPSlice(value["rank"], value["size"], "option tp")
    except ValueError as e:
        raise OptionsError(f"option 'tp': {e}") from None


def mesh_slice_from_graph(gm) -> TPSlice | None:
    """The tensor-parallel rank/size of the DTensor parameters among ``gm``'s inputs, or None.

    A mesh dimension counts when a parameter is sharded along it: the one named ``"tp"``, or the
    only one of a 1-D mesh. Two different answers (two meshes) are an error: give option ``tp``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    found = set()
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("example_value")
        if not isinstance(val, DTensor):
            continue
        mesh = val.device_mesh
        names = mesh.mesh_dim_names
        if names and "tp" in names:
            dim = names.index("tp")
        elif mesh.ndim == 1:
            dim = 0
        else:
            continue
        if val.placements[dim].is_shard() and mesh.size(dim) > 1:
            found.add((mesh.get_local_rank(dim), mesh.size(dim)))
    if len(found) > 1:
        from .config import ConfigError

        raise ConfigError(f"the graph's parameters are sharded over several tensor-parallel meshes "
                          f"(rank, size) {sorted(found)}; give option tp={{'rank': r, 'size': T}}")
    if not found:
        return None
    rank, size = found.pop()
    return TPSlice(rank, size, "device mesh of the graph's DTensor parameters")


def _dist_slice(local_heads: int, config_heads: int | None) -> TPSlice | None:
    """The default process group as the tensor-parallel group, when its world size explains
    the difference between the config's heads and the graph's."""
    import torch.distributed as dist

    if config_heads is None or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world > 1 and local_heads * world == config_heads:
        return TPSlice(dist.get_rank(), world, "torch.distributed world")
    return None


def check_slice(tp: TPSlice, local_heads: int, config) -> None:
    """Raise ``ConfigError`` unless a config for the whole model fits ``tp``'s ``local_heads``."""
    from .config import ConfigError

    total = config.num_heads
    if total is None:
        return
    if total % tp.size:
        raise ConfigError(f"config {config.source} has {total} heads per layer, not divisible by the "
                          f"tensor-parallel size {tp.size} ({tp.source})")
    if local_heads * tp.size != total:
        raise ConfigError(f"config {config.source} has {total} heads per layer; rank {tp.rank} of tensor-"
                          f"parallel size {tp.size} ({tp.source}) sees {local_heads} query heads, and "
                          f"{local_heads} x {tp.size} = {local_heads * tp.size} != {total}")


def resolve_tp(gm, option, local_heads: int | None, config) -> TPSlice | None:
    """This rank's slice of ``config`` for graph ``gm`` (None: use the config as it is).

    ``local_heads`` is the query-head count the graph's attention calls show (None when they
    disagree or are unknown; then only the option or the mesh can say). Errors are
    ``ConfigError`` with the rank, the size and where they came from."""
    from .config import ConfigError

    if option is False:
        return None
    tp = option if isinstance(option, TPSlice) else None
    if tp is None:
        tp = mesh_slice_from_graph(gm)
    if tp is None and _is_int(local_heads):
        tp = _dist_slice(local_heads, config.num_heads)
    if tp is None or tp.size == 1:
        if (_is_int(local_heads) and config.num_heads is not None and config.num_heads > local_heads
                and config.num_heads % local_heads == 0):
            raise ConfigError(
                f"config {config.source} has {config.num_heads} heads per layer, the model's attention calls "
                f"have {local_heads}: if the model is tensor-parallel ({config.num_heads // local_heads} "
                f"ranks), run it under torch.distributed or give option tp={{'rank': r, 'size': T}}")
        return None
    if _is_int(local_heads):
        check_slice(tp, local_heads, config)
    log.info("mi_compile: %s", tp.describe(local_heads))
    return tp


class TPConfigView:
    """A whole-model config as one rank sees it: ``heads_for(layer, n)`` gives the patterns of
    global heads ``[rank*n, (rank+1)*n)``; everything else is the config's own. A config family
    is viewed member by member (:func:`rank_config`)."""

    def __init__(self, config, tp: TPSlice):
        from .config import ConfigFamily

        if isinstance(config, ConfigFamily):
            raise TypeError(f"TPConfigView takes a single config, got the config family {config.source}: "
                            "use rank_config(), which views each member")
        self.config = config
        self.tp = tp

    def __getattr__(self, name):
        return getattr(self.config, name)

    def heads_for(self, layer: int, num_heads: int) -> list:
        check_slice(self.tp, num_heads, self.config)
        return slice_heads(self.config.heads_for(layer, num_heads * self.tp.size), self.tp.rank, self.tp.size)

    def check_model(self, num_layers: Optional[int], num_heads: int) -> None:
        check_slice(self.tp, num_heads, self.config)
        self.config.check_model(num_layers, num_heads * self.tp.size)


def rank_config(config, tp: TPSlice):
    """This rank's view of a whole-model config: a :class:`TPConfigView`, or for a config family
    the same family of its members' views (every member sliced to this rank's heads)."""
    from .config import ConfigFamily

    if isinstance(config, ConfigFamily):
        return ConfigFamily(config.source, [TPConfigView(m, tp) for m in config.members], config.model)
    return TPConfigView(config, tp)


def tp_option_from_model(model) -> dict | None:
    """``{"rank": r, "size": T}`` of a model that transformers sharded (``tp_plan="auto"``:
    ``model._device_mesh``, 5.24: dims ``("pp", "fsdp", "tp")``, older: 1-D; ``model.tp_size``),
    or None. For the option ``tp`` where the graph shows no DTensor parameters."""
    mesh = getattr(model, "_device_mesh", None)
    size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None)
    names = getattr(mesh, "mesh_dim_names", None)
    if mesh is not None and ((names and "tp" in names) or mesh.ndim == 1):
        tp_mesh = mesh["tp"] if names and "tp" in names else mesh
        if tp_mesh.size() > 1:
            return {"rank": tp_mesh.get_local_rank(), "size": tp_mesh.size()}
        return None
    if _is_int(size) and size > 1:
        import torch.distributed as dist

        return {"rank": dist.get_rank() % size, "size": size}
    return None
