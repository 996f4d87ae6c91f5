"""Latency tables: the cost of one prunable layer shape at each n, which a latency target learns
against. ``sparsamba profile`` (``sparsamba/profile.py``) measures them with the engine on the target
machine; for planning on another machine ``cost_model_table`` predicts them from the bytes a decode
step reads (a measured table is the one to trust: where the sparse kernels are compute-bound, a c4n1
row can cost more than a dense one).

File format (JSON):
    {"format": "sparsamba.latency", "version": 1, "source": "cost-model" | "measured",
     "device": "...", "dtype": "f16", "unit": "s",
     "entries": [{"out": 512, "in": 128, "n": 2, "seconds": 1.2e-6}, ...]}
``seconds`` is the time of the whole layer (all ``out`` rows) with every row at that n.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import formats
from ..errors import SparsambaError


def cost_model_table(
    shapes: list[tuple[int, int]], dtype: str = "f16", bandwidth: float = 13.4e9, device: str = "cost model"
) -> dict:
    """Predicted decode time of each (out, in) shape at n = 0..4: bytes read ÷ memory bandwidth.
    A row at n keeps (4 − n) values per group of 4 plus 2 bits of position per kept value (none for
    dense rows), and an n = 4 row is not read at all."""
    value_bytes = formats.get(dtype).value_bytes
    entries = []
    for out, inn in sorted(set(shapes)):
        groups = math.ceil(inn / 4)
        for n in range(5):
            kept = (4 - n) * groups
            index_bytes = 0 if n == 0 else kept * 2 / 8
            nbytes = out * (kept * value_bytes + index_bytes)
            entries.append({"out": out, "in": inn, "n": n, "seconds": nbytes / bandwidth})
    return {
        "format": "sparsamba.latency",
        "version": 1,
        "source": "cost-model",
        "device": device,
        "dtype": dtype,
        "unit": "s",
        "bandwidth_bytes_per_s": bandwidth,
        "entries": entries,
    }


def load_latency_table(path: str | Path) -> dict:
    path = Path(path)
    try:
        t = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsambaError(f"{path}: cannot read latency table ({e})") from None
    if not isinstance(t, dict) or t.get("format") != "sparsamba.latency" or t.get("version") != 1:
        raise SparsambaError(f"{path}: not a sparsamba latency table (format 'sparsamba.latency', version 1)")
    for i, e in enumerate(t.get("entries", [])):
        if not (isinstance(e, dict) and {"out", "in", "n", "seconds"} <= e.keys()) or not e["seconds"] >= 0:
            raise SparsambaError(f"{path}: entry {i} needs out, in, n and a non-negative seconds")
    return t


def row_costs(table: dict, out: int, inn: int) -> torch.Tensor:
    """(5,) cost of one row of an (out, in) layer at n = 0..4."""
    found = {e["n"]: e["seconds"] for e in table["entries"] if e["out"] == out and e["in"] == inn}
    missing = [n for n in range(5) if n not in found]
    if missing:
        raise SparsambaError(
            f"latency table has no entry for layer shape ({out}, {inn}) at n = {missing}; profile this model's shapes"
        )
    return torch.tensor([found[n] / out for n in range(5)], dtype=torch.float32)


def expected_latency(table: dict, layers: dict[str, tuple[int, int, torch.Tensor]]) -> float:
    """Predicted latency of a pruned model: layers maps name -> (out, in, n_removed per row)."""
    total = 0.0
    for out, inn, n in layers.values():
        total += float(row_costs(table, out, inn)[n.long()].sum())
    return total
