"""Offline per-head pattern search (MInference, arXiv 2407.02490, section 3.2 "kernel-aware search").

    from mi_compile.search import search_config, calibration_ids
    ids = calibration_ids(tokenizer, 2048, seed=0)
    config, report = search_config(model, ids, budget=0.3)
    config.save("model_searched.json"); print(report.table())

CLI: ``python -m mi_compile search --model smollm2 --out config.json`` and
``python -m mi_compile plot config.json``.

Modules: :mod:`.capture` (q/k per layer through the backend), :mod:`.prompt` (calibration
text), :mod:`.candidates` (patterns tried), :mod:`.score` (recall / density, the choice),
:mod:`.search` (the driver and report), :mod:`.plot` (pictures), :mod:`.cli` (commands).
"""
from .candidates import candidate_patterns
from .capture import Capture, capture_qk
from .prompt import calibration_ids, random_ids
from .score import choose, dense_probs, score_candidates, score_rows
from .search import HeadResult, SearchReport, choose_config, search_config

__all__ = ["search_config", "choose_config", "SearchReport", "HeadResult", "capture_qk", "Capture", "calibration_ids",
           "random_ids", "candidate_patterns", "score_candidates", "score_rows", "dense_probs", "choose"]
