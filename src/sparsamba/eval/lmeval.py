"""Zero-shot multiple-choice accuracy through lm-evaluation-harness.

A pruned model is an HF-format directory of dense tensors with exact zeros, so lm-eval's own ``hf``
model type scores it as it is; this module only runs lm-eval offline with local task files
(``include_path``: a folder of task YAMLs whose data are local JSON-lines files) and returns the
metrics as plain numbers.
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
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for ``tasks`` on the model in ``model_dir``."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SparsambaError(
            "lm-eval is not installed: pip install 'sparsamba[eval]' (lm-eval, accelerate)"
        ) from None
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SparsambaError(f"{model_dir}: not an HF-format model directory (no config.json)")
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
