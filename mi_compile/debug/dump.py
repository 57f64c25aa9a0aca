"""Write a graph before/after the passes, plus the explain table, to a folder and to TORCH_TRACE.

Files (``<dump_dir>/``): ``graph_<id>_before.py``, ``graph_<id>_after.py``, ``graph_<id>_explain.txt``.
The same three artifacts go to ``torch._logging.trace_structured`` so that
``TORCH_TRACE=/tmp/trace python ...`` followed by ``tlparse /tmp/trace`` shows them next to
Dynamo's and Inductor's own.
"""
from __future__ import annotations

import logging
import os

from torch._logging import trace_structured

from .explain import format_table

log = logging.getLogger(__name__)


def _artifact(name: str, text: str) -> None:
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"},
                     payload_fn=lambda: text)


def dump_report(report, dump_dir: str | None) -> list[str]:
    table = format_table(report.sites, config_source=report.config_source, tp=getattr(report, "tp", None),
                         family=getattr(report, "family", None))
    stem = f"mi_compile_graph_{report.graph_id}"
    _artifact(stem + "_before", report.before_code)
    _artifact(stem + "_after", report.after_code)
    _artifact(stem + "_explain", table)
    if not dump_dir:
        return []
    os.makedirs(dump_dir, exist_ok=True)
    paths = []
    for suffix, text in (("before.py", report.before_code), ("after.py", report.after_code),
                         ("explain.txt", table + "\n")):
        path = os.path.join(dump_dir, f"graph_{report.graph_id}_{suffix}")
        with open(path, "w") as f:
            f.write(text)
        paths.append(path)
    log.info("mi_compile: wrote %s", ", ".join(paths))
    return paths
