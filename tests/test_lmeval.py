"""lm-eval scores a pruned model directory offline, from a task the test writes to local files."""

import importlib.util
import json
import os

import pytest
from conftest import quick_prune_args

# lm-eval and its data stack are the optional `eval` extra: without them these tests skip, unless
# SPARSAMBA_REQUIRE_LMEVAL=1 (CI) makes that a failure
if importlib.util.find_spec("lm_eval") is None:
    why = "lm-eval is not installed (pip install -e '.[eval]')"
    if os.environ.get("SPARSAMBA_REQUIRE_LMEVAL") == "1":
        pytest.fail(f"SPARSAMBA_REQUIRE_LMEVAL=1 but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)

from sparsamba.cli import main

TASK = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_unknown_task_is_a_clear_error(tiny_model_dir, tmp_path):
    from sparsamba import SparsambaError
    from sparsamba.eval.lmeval import run_tasks

    with pytest.raises(SparsambaError, match="unknown lm-eval task"):
        run_tasks(tiny_model_dir, ["no_such_task_xyz"], tmp_path)


def test_a_folder_name_cannot_inject_model_options(tiny_model_dir, tmp_path, monkeypatch):
    """lm-eval parses "k=v,k=v" strings: a folder named "m,trust_remote_code=True" once ran the
    folder's own Python. The options go as a dict, the folder name whole, remote code refused."""
    import shutil

    import lm_eval

    from sparsamba.eval.lmeval import run_tasks

    evil = tmp_path / "m,trust_remote_code=True,dtype=float16"
    shutil.copytree(tiny_model_dir, evil)
    seen = {}

    def fake_evaluate(**kw):
        seen.update(kw)
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    run_tasks(evil, ["arc_easy"], None)
    assert seen["model_args"] == {"pretrained": str(evil), "dtype": "float32", "trust_remote_code": False}


@pytest.fixture(scope="module")
def pruned_and_packed(tiny_model_dir, tmp_path_factory):
    """The tiny model pruned (Wanda 2:4) as a directory, and the same weights as a packed f32 GGUF."""
    from sparsamba.compile import compile_model

    root = tmp_path_factory.mktemp("lmeval-packed")
    out = root / "pruned"
    assert main(quick_prune_args(tiny_model_dir, tiny_model_dir.parent / "text.txt", out)) == 0
    return out, compile_model(out, root / "pruned-f32.gguf", dtype="f32").path


def _toy_task(tmp_path, n: int = 12):
    rows = [
        {
            "ctx": f"And it came to pass on day {i}, that the",
            "choices": [" sower", " king", " people"],
            "label": i % 3,
        }
        for i in range(n)
    ]
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(TASK.format(data=data))
    return tasks


def test_engine_loglikelihoods_match_the_torch_twin(pruned_and_packed):
    """The packed f32 model through the engine against lm-eval's own hf model on the same weights: every
    request's loglikelihood within 1e-3 nats and the same greedy flag; rolling loglikelihoods (several
    windows: max_length 16) within 1e-3 nats per window."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from sparsamba.eval.lmeval_engine import EngineHarnessLM

    out, gguf = pruned_and_packed
    pairs = [
        ("And it came to pass, that the", " sower"),
        ("The king said ", "unto the people"),
        ("", " shepherd"),
    ]
    pairs += [(f"day {i} of the prophet", " servant went out") for i in range(3)]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    text = " ".join(["And the servant of the king went out to the people, and the prophet spake."] * 4)
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    hf = HFLM(pretrained=str(out), dtype="float32", batch_size=4, device="cpu", max_length=16)
    eng = EngineHarnessLM(gguf, threads=1, max_length=16)
    try:
        a, b = hf.loglikelihood(reqs), eng.loglikelihood(reqs)
        ra, rb = hf.loglikelihood_rolling(rolling), eng.loglikelihood_rolling(rolling)
    finally:
        eng.close()
    assert all(x[0] < 0 for x in b)
    for (lla, ga), (llb, gb) in zip(a, b):
        assert abs(lla - llb) < 1e-3 and ga == gb
    n_windows = -(-len(eng.tok_encode(text)) // 16)
    assert n_windows > 2 and abs(ra[0] - rb[0]) < 1e-3 * n_windows


def test_lm_eval_of_a_pruned_model_and_of_its_packed_gguf(pruned_and_packed, tmp_path, capsys):
    """`sparsamba lm-eval` on the pruned directory (torch, lm-eval's hf model) and on its packed f32
    GGUF (the native engine): the same accuracy."""
    out, gguf = pruned_and_packed
    tasks = _toy_task(tmp_path)
    acc = {}
    for model in (out, gguf):
        capsys.readouterr()
        assert (
            main(["lm-eval", str(model), "--tasks", "toy_mc", "--include-path", str(tasks), "-t", "1"]) == 0
        )
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("toy_mc"))
        acc[model] = float(line.split("acc")[1].split()[0])
        assert 0.0 <= acc[model] <= 1.0 and round(acc[model] * 12, 3) == round(acc[model] * 12)
    assert acc[gguf] == acc[out]


def test_a_missing_gguf_is_one_clear_error(tmp_path, capsys):
    assert main(["lm-eval", str(tmp_path / "none.gguf"), "--tasks", "toy_mc"]) != 0
    err = capsys.readouterr().err
    assert "no such packed model file" in err and "Traceback" not in err
