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


def test_lm_eval_on_a_pruned_model(tiny_model_dir, tmp_path, capsys):
    from sparsamba.eval.lmeval import run_tasks

    rows = [
        {
            "ctx": f"And it came to pass on day {i}, that the",
            "choices": [" sower", " xylophone quantum"],
            "label": 0,
        }
        for i in range(12)
    ]
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "pruned"
    assert main(quick_prune_args(tiny_model_dir, tiny_model_dir.parent / "text.txt", out)) == 0
    res = run_tasks(out, ["toy_mc"], tasks, batch_size=4)
    assert 0.0 <= res["toy_mc"]["acc"] <= 1.0 and res["toy_mc"]["acc"] * 12 == round(
        res["toy_mc"]["acc"] * 12
    )
    capsys.readouterr()
    assert main(["lm-eval", str(out), "--tasks", "toy_mc", "--include-path", str(tasks)]) == 0
    assert "toy_mc" in capsys.readouterr().out


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
