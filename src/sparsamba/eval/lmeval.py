"""Zero-shot multiple-choice accuracy through lm-evaluation-harness.

A pruned model is an HF-format directory of dense tensors with exact zeros, so lm-eval's own ``hf``
model type scores it as it is; a packed ``MODEL.gguf`` (``sparsamba compile``) is scored by the native
engine (``lmeval_engine.EngineHarnessLM``: the loglikelihoods from the engine's logits). This module
runs lm-eval offline with local task files (``include_path``: a folder of task YAMLs whose data are
local JSON-lines files) and returns the metrics as plain numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SparsambaError


def run_tasks(
    model_dir: str | Path,
    tasks: list[str],
    include_path: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for ``tasks`` on the model in ``model_dir`` (an HF-format directory) or
    a packed ``.gguf`` file (the native engine, ``threads`` engine threads; batch_size and device are
    the torch model's)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SparsambaError(
            "lm-eval is not installed: pip install 'sparsamba[eval]' (lm-eval, accelerate)"
        ) from None
    model_dir = Path(model_dir)
    packed = model_dir.suffix == ".gguf"
    if packed and not model_dir.is_file():
        raise SparsambaError(f"{model_dir}: no such packed model file")
    if not packed and not (model_dir / "config.json").is_file():
        raise SparsambaError(
            f"{model_dir}: not an HF-format model directory (no config.json) nor a packed .gguf file"
        )
    if include_path is not None and not Path(include_path).is_dir():
        raise SparsambaError(f"{include_path}: no such folder of task YAML files")
    # offline by default: the tasks' data must be local files
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tm = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise SparsambaError(
            f"unknown lm-eval task(s) {unknown}; pass --include-path with their YAML files, "
            "or use lm-eval's built-in names (they need a network or local copies of their data)"
        )
    if packed:
        from .lmeval_engine import EngineHarnessLM

        lm = EngineHarnessLM(model_dir, threads=threads)
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit)
        finally:
            lm.close()
    else:
        res = lm_eval.simple_evaluate(
            model="hf",
            # a dict, never a "k=v,k=v" string: a folder name with a comma would inject options
            # (trust_remote_code=True ran a crafted folder's Python code)
            model_args={"pretrained": str(model_dir), "dtype": "float32", "trust_remote_code": False},
            tasks=tasks,
            task_manager=tm,
            batch_size=batch_size,
            limit=limit,
            device=device,
        )
    out: dict[str, dict[str, float]] = {}
    for task, metrics in res["results"].items():
        out[task] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k
        }
    return out
