"""Bad input, one row per case: what the user gave, the one line sparsamba must answer with, and
nothing left behind. Every case runs the CLI in-process: exit code 1, a single
``sparsamba <cmd>: error: ...`` line on stderr, no traceback, no new file beside the inputs."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsamba.cli import main


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is DROP:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


DROP = object()


def poison_weight(d: Path) -> None:
    sd = load_file(d / "model.safetensors")
    k = next(k for k in sd if k.endswith("mixer.D"))
    sd[k][0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def shard_index(name: str) -> Callable[[Path], None]:
    """Replace model.safetensors by an index that names ``name`` as the only shard."""

    def edit(d: Path) -> None:
        sd = load_file(d / "model.safetensors")
        (d / "model.safetensors").unlink()
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(sd, name)}))

    return edit


@dataclass
class Case:
    name: str
    edit: Callable[[Path], None]  # spoils a copy of a good model directory
    argv: Callable[[Path, Path], list[str]]  # (model dir, scratch dir) -> CLI arguments
    error: str  # a regex the one error line must match


def eval_cmd(model: Path, tmp: Path) -> list[str]:
    return ["eval", str(model), "--data", str(model.parent / "text.txt"), "--seqlen", "16", "--max-windows", "2"]


CASES = [
    Case("config: hidden_size missing", edit_config(hidden_size=DROP), eval_cmd, r"hidden_size missing"),
    Case("config: expand -2", edit_config(expand=-2), eval_cmd, r"expand must be a positive integer, got -2"),
    Case(
        "config: time_step_rank 'banana'",
        edit_config(time_step_rank="banana"),
        eval_cmd,
        r"time_step_rank must be a positive integer or \"auto\", got 'banana'",
    ),
    Case("config: hidden_size 2e6 (a float)", edit_config(hidden_size=2e6), eval_cmd, r"hidden_size must be a positive integer"),
    Case(
        "config: hidden_size 2000000 (no such weights)",
        edit_config(hidden_size=2_000_000),
        eval_cmd,
        r"the stored embedding is .* the weights and config.json disagree",
    ),
    Case(
        "config: 1e9 layers",
        edit_config(num_hidden_layers=1_000_000_000),
        eval_cmd,
        r"num_hidden_layers is 1000000000, but the weights hold 2 layers",
    ),
    Case(
        "config: layer_norm_epsilon -1",
        edit_config(layer_norm_epsilon=-1),
        eval_cmd,
        r"layer_norm_epsilon must be a positive finite number",
    ),
    Case("weights: a NaN", poison_weight, eval_cmd, r"mixer.D holds NaN or infinite values"),
    Case(
        "shards: a name outside the folder",
        shard_index("../../outside.safetensors"),
        eval_cmd,
        r"shard '../../outside.safetensors' is not a .safetensors file inside",
    ),
    Case("shards: an absolute path", shard_index("/etc/passwd"), eval_cmd, r"shard '/etc/passwd' is not a .safetensors file"),
]


def nothing(d: Path) -> None:
    pass


def packed(d: Path) -> None:
    """Compile the (good) model folder into d/../m.gguf: the cases that run the engine use it."""
    from sparsamba.compile import compile_model

    compile_model(d, d.parent / "m.gguf", dtype="f32")


def corrupt_tokenizer(d: Path) -> None:
    """A packed file whose embedded tokenizer JSON is broken (one byte changed: every offset holds)."""
    packed(d)
    f = d.parent / "m.gguf"
    data = bytearray(f.read_bytes())
    i = data.index(b'"added_tokens"')
    data[i] = ord("X")  # no longer JSON
    f.write_bytes(bytes(data))


def prune_cmd(*extra: str) -> Callable[[Path, Path], list[str]]:
    def argv(model: Path, tmp: Path) -> list[str]:
        out = tmp / "out"
        base = ["prune", str(model), "--calib", str(tmp / "text.txt"), "--nsamples", "2", "--seqlen", "16"]
        base += ["--method", "wanda", "--pattern", "2:4"] if "--steps" not in extra else ["--sparsity", "0.5"]
        return [*base, "-o", str(out), *extra] if "-o" not in extra else [*base, *extra]

    return argv


def run_cmd(*extra: str, model: str = "m.gguf") -> Callable[[Path, Path], list[str]]:
    return lambda m, tmp: ["run", str(tmp / model) if model else str(m), "-n", "2", *extra]


CASES += [
    Case("prune: --row-block 0", nothing, prune_cmd("--row-block", "0"), r"row_block must be a whole number >= 1"),
    Case("prune: --steps -3", nothing, prune_cmd("--steps", "-3"), r"steps must be a whole number >= 0"),
    Case("prune: --reconstruct -1", nothing, prune_cmd("--reconstruct", "-1"), r"--reconstruct must be a whole number of steps >= 0, got -1"),
    Case("prune: --reconstruct-lr 5", nothing, prune_cmd("--reconstruct-lr", "5"), r"--reconstruct-lr must be in \(0, 1\), got 5.0"),
    Case("prune: --reconstruct-lr nan", nothing, prune_cmd("--reconstruct-lr", "nan"), r"--reconstruct-lr must be in \(0, 1\), got nan"),
    Case("prune: --lr inf", nothing, prune_cmd("--lr", "inf"), r"lr must be a finite number >= 0, got inf"),
    Case("prune: --scope layer", nothing, prune_cmd("--scope", "layer"), r"unknown scope 'layer'; use global or block"),
    Case("prune: -o under a file", nothing, prune_cmd("-o", "{tmp}/text.txt/sub"), r"text.txt is a file and not a folder"),
    Case("prune: --threads 100000", nothing, prune_cmd("--threads", "100000"), r"threads must be a whole number from 1"),
    Case("run: a model folder", nothing, run_cmd(model=""), r"is a model folder, not a packed model; compile it first"),
    Case("run: --temperature nan", packed, run_cmd("--temperature", "nan"), r"temperature must be a finite number"),
    Case("run: --temperature -1", packed, run_cmd("--temperature", "-1"), r"temperature must be a finite number >= 0"),
    Case("run: --top-k -1", packed, run_cmd("--top-k", "-1"), r"top-k must be a whole number >= 0"),
    Case("run: -n 0", packed, run_cmd("-n", "0"), r"must be a positive integer, got 0"),
    Case("run: --threads 3000000000", packed, run_cmd("--threads", "3000000000"), r"threads must be a whole number"),
    Case("run: a corrupt tokenizer", corrupt_tokenizer, run_cmd(), r"its tokenizer .* is corrupt"),
    Case("eval: --threads 0", nothing, lambda m, t: [*eval_cmd(m, t), "--threads", "0"], r"threads must be"),
]


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    shutil.copy(tiny_model_dir.parent / "text.txt", tmp_path / "text.txt")
    case.edit(model)
    before = _listing(tmp_path)
    capsys.readouterr()
    torch.manual_seed(0)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv(model, tmp_path)]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"sparsamba {argv[0]}: error: "), err
    assert re.search(case.error, lines[0]), lines[0]
    assert _listing(tmp_path) == before, "the failed command left files behind"
