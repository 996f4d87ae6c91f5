"""Latency tables measured by the engine: the C entry points' refusals, the table's format and file,
`sparsamba profile`, a prune that learns against a measured table, the engine's timing of a
compiled model, and (slow) the round-trip pipeline of scripts/latency_roundtrip.py."""

import ctypes
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_pruned

from sparsamba import SparsambaError, load_model
from sparsamba.cli import main
from sparsamba.compile import compile_model
from sparsamba.model.mamba1 import Mamba1Config
from sparsamba.prune.latency import load_latency_table, row_costs
from sparsamba.runtime.engine import Engine, EngineError
from sparsamba.runtime.profile import (
    BLOCK_STAGES,
    _lib,
    decode_stages,
    measure_layers,
    predicted_latency,
    profile_linear,
    profile_table,
    prunable_shapes,
    release,
    stages_table,
    write_table,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = Mamba1Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)


# ---------------------------------------------------------------- the C entry points


@pytest.mark.parametrize(
    "args,msg",
    [
        ((0, 16, 0, 1, 5), "layer shape (0, 16) is not valid"),
        ((16, -3, 0, 1, 5), "layer shape (16, -3) is not valid"),
        ((16, 16, 4, 1, 5), "n = 4 is not 0..3"),
        ((16, 16, -1, 1, 5), "n = -1 is not 0..3"),
        ((16, 16, 2, 7, 5), "dtype 7 is not 0 (f32), 1 (f16) or 24 (int8)"),
        ((16, 16, 2, 1, 0), "reps must be positive"),
    ],
)
def test_profile_linear_refuses_bad_arguments(args, msg):
    lib, sec, err = _lib(), ctypes.c_double(-1.0), ctypes.create_string_buffer(256)
    assert lib.sb_profile_linear(*args, ctypes.byref(sec), err, len(err)) == 4  # SB_ERR_ARG
    assert msg in err.value.decode()
    assert sec.value == -1.0  # nothing written


def test_profile_c_entries_refuse_null_outputs():
    lib, err = _lib(), ctypes.create_string_buffer(256)
    assert lib.sb_profile_linear(16, 16, 0, 1, 5, None, err, len(err)) == 4
    assert "seconds non-NULL" in err.value.decode()
    assert lib.sb_profile_model(None, 5, None, err, len(err)) == 4
    assert "a model, a positive reps" in err.value.decode()


def test_profile_linear_wrapper_errors():
    with pytest.raises(EngineError, match="n = 5 is not 0..3"):
        profile_linear(16, 16, 5, "f16", 3)
    with pytest.raises(SparsambaError, match="dtype 'bf16' is not supported"):
        profile_linear(16, 16, 0, "bf16", 3)


def test_profile_linear_times_every_dtype_and_n():
    # no ordering between n is asserted: where the sparse kernels are compute-bound (AVX2 on a fast
    # memory system), c4n1 can cost more than dense, which is what a measured table is for
    for dtype in ("f32", "f16", "int8"):
        for n in range(4):
            s = profile_linear(64, 72, n, dtype, 5, threads=1)  # G = 18: an odd group count in the codes
            assert 0 < s < 0.1
    with pytest.raises(SparsambaError, match="threads must be positive"):
        profile_linear(16, 16, 0, "f16", 3, threads=0)
    release()


# ---------------------------------------------------------------- the table


def test_table_format_and_file_round_trip(tmp_path):
    t = profile_table(TINY, dtype="f16", threads=1, reps=3)
    shapes = prunable_shapes(TINY)
    di, R, N = 64, 2, 8
    assert sorted(set(shapes.values())) == sorted({(2 * di, 32), (R + 2 * N, di), (di, R), (32, di)})
    assert (t["format"], t["version"], t["source"], t["dtype"], t["unit"]) == (
        "sparsamba.latency",
        1,
        "measured",
        "f16",
        "s",
    )
    assert (
        t["threads"] == 1 and t["kernels"] in ("scalar", "avx2", "avx512", "avx512-vnni", "neon") and t["machine"]["cpu"]
    )
    assert t["layers"] == {k: list(v) for k, v in shapes.items()}
    assert len(t["entries"]) == 5 * len(set(shapes.values()))
    for e in t["entries"]:
        assert e["seconds"] == 0.0 if e["n"] == 4 else e["seconds"] > 0
    path = write_table(t, tmp_path / "sub" / "table.json")
    assert load_latency_table(path) == json.loads(json.dumps(t))
    assert [p.name for p in path.parent.iterdir()] == ["table.json"]  # no temporary left behind
    for out, inn in shapes.values():
        c = row_costs(load_latency_table(path), out, inn)
        assert c.shape == (5,) and c[4] == 0 and bool((c[:4] > 0).all())
    with pytest.raises(SparsambaError, match="already exists"):
        write_table(t, path)
    write_table({**t, "threads": 2}, path, overwrite=True)
    assert load_latency_table(path)["threads"] == 2


def test_profile_table_refusals():
    with pytest.raises(SparsambaError, match="--device opencl: not available"):
        profile_table(TINY, device="opencl")
    with pytest.raises(SparsambaError, match="unknown device 'tpu'"):
        profile_table(TINY, device="tpu")
    with pytest.raises(SparsambaError, match="threads must be positive"):
        profile_table(TINY, threads=0)
    with pytest.raises(SparsambaError, match="dtype 'q4' is not supported"):
        profile_table(TINY, dtype="q4")


def test_cli_profile_then_prune_meets_the_target(tiny_model_dir, tmp_path, capsys):
    table = tmp_path / "table.json"
    assert main(["profile", str(tiny_model_dir), "-o", str(table), "--reps", "5", "--threads", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    t = load_latency_table(table)
    assert t["source"] == "measured" and t["threads"] == 1
    assert main(["profile", str(tiny_model_dir), "-o", str(table)]) == 1  # exists: refused before work
    assert "already exists" in capsys.readouterr().err
    assert main(["profile", str(tiny_model_dir), "-o", str(tmp_path / "x.json"), "--device", "opencl"]) == 1
    assert "not available" in capsys.readouterr().err
    # a budget of 60% of the dense latency: met exactly (to a row) whatever the measured costs are,
    # since rows at n = 4 cost nothing (a target between dense and all-c4n3 need not be reachable
    # from both sides: layers this small run c4n3 no faster than dense, per-call costs dominating)
    cost = {(e["out"], e["in"], e["n"]): e["seconds"] for e in t["entries"]}
    goal = 0.6 * sum(cost[(o, i, 0)] for o, i in t["layers"].values())
    out = tmp_path / "pruned"
    args = ["prune", str(tiny_model_dir), "--method", "c4", "--pattern", "c4", "--latency-table", str(table)]
    args += ["--latency", repr(goal), "--steps", "4", "--nsamples", "2", "--seqlen", "16"]
    args += ["--calib", str(tiny_model_dir.parent / "text.txt"), "--no-compensate", "-o", str(out)]
    assert main(args) == 0
    got = predicted_latency(t, load_model(out))
    biggest_row = max(e["seconds"] / e["out"] for e in t["entries"])
    assert abs(got - goal) <= biggest_row + 1e-12
    assert json.loads((out / "sparsity.json").read_text())["target"]["latency"] == goal


def test_measure_layers_of_a_compiled_model(tmp_path):
    d = random_pruned(tmp_path / "m", seed=1, hidden_size=40, expand=2, time_step_rank=5, state_size=4)
    compile_model(d, tmp_path / "m.gguf", dtype="f32")
    with Engine(tmp_path / "m.gguf", threads=1) as eng:
        t = measure_layers(eng, reps=5)
        with pytest.raises(SparsambaError, match="reps must be positive"):
            measure_layers(eng, reps=0)
    assert list(t) == [f"blk.{i}.{k}" for i in range(2) for k in ("ssm_in", "ssm_x", "ssm_dt", "ssm_out")]
    assert all(0 < s < 0.1 for s in t.values())


def _stage_sum(r: dict) -> float:
    return sum(v for b in r["blocks"] for v in b.values()) + sum(r["top"].values())


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_stages_account_for_the_step(tmp_path, threads):
    d = random_pruned(tmp_path / "m", seed=2, hidden_size=40, expand=2, time_step_rank=5, state_size=4)
    compile_model(d, tmp_path / "m.gguf", dtype="f16")
    with Engine(tmp_path / "m.gguf", threads=threads) as eng:
        eng.prefill([1, 2, 3])
        before = eng.decode(5)
        # the uncounted time is the team's start before the clock: a descheduled thread (a loaded
        # machine) stretches it in one call, a missing stage mark in every call, so keep the best of 3
        runs = [decode_stages(eng, 8) for _ in range(3)]
        r = max(runs, key=lambda x: _stage_sum(x) / x["total"])
        with pytest.raises(SparsambaError, match="n_tokens must be positive"):
            decode_stages(eng, 0)
        lib = _lib()
        err = ctypes.create_string_buffer(256)
        d0 = ctypes.c_double()
        assert lib.sb_profile_decode(eng.model_handle, 4, None, None, ctypes.byref(d0), err, len(err)) == 4
        # the engine's state is its own: a decode after profiling gives the same logits as before it
        eng.reset()
        eng.prefill([1, 2, 3])
        assert np.array_equal(eng.decode(5), before)
    assert len(r["blocks"]) == 2 and all(list(b) == list(BLOCK_STAGES) for b in r["blocks"])
    stages = [v for b in r["blocks"] for v in b.values()] + list(r["top"].values())
    assert all(v >= 0 for v in stages) and r["top"]["head"] > 0 and r["blocks"][0]["in_proj"] > 0
    # every second of the step is in some stage (the marks sit back to back), and none is counted twice
    assert 0.9 * r["total"] <= sum(stages) <= 1.001 * r["total"]
    assert all(_stage_sum(x) <= 1.001 * x["total"] for x in runs)
    products = [b for blk in r["bytes"]["blocks"] for k, b in blk.items() if k.endswith("_proj")]
    others = [b for blk in r["bytes"]["blocks"] for k, b in blk.items() if not k.endswith("_proj")]
    assert all(b > 0 for b in products) and not any(others) and r["bytes"]["top"]["head"] > 0
    table = stages_table(r)
    assert "| in_proj |" in table and "| step (wall) |" in table


# ---------------------------------------------------------------- the round trip


def _roundtrip_module():
    spec = importlib.util.spec_from_file_location(
        "latency_roundtrip", ROOT / "scripts" / "latency_roundtrip.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_latency_roundtrip_pipeline(tmp_path):
    """scripts/latency_roundtrip.py end to end on a small model: profile -> prune to a latency target
    halfway between all-c4n3 and dense -> compile -> the engine's timing of the compiled model.

    Only what is deterministic is asserted (the fix-up meets the target in the table; every figure is
    there). The 15% comparison of the measured latency with the target is the script's to print, not a
    test's to assert: on a shared 2-core machine, one table entry moves by 10-25% between two profiles
    when a neighbour's load comes and goes, and the learner then favours the n whose entry came out low,
    so the measured/target figure fails some runs that the same code passes on a quiet machine."""
    torch.set_flush_denormal(True)
    rec = _roundtrip_module().roundtrip(
        tmp_path, hidden=256, layers=2, threads=1, reps=10, rounds=1, log=print
    )
    assert rec["c4n3_predicted_s"] < rec["target_s"] < rec["dense_predicted_s"]
    assert abs(rec["predicted_s"] / rec["target_s"] - 1) < 0.01  # the prune's fix-up
    for k in ("measured_s", "dense_measured_s", "predicted_same_window_s"):
        assert 0 < rec[k] < 0.1, (k, rec[k])
