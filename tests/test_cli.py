"""The command line: output on good input, one clear line and exit 1 on bad input."""

import json
import subprocess
import sys

import pytest
import torch

from sparsamba.cli import main


def test_eval_prints_perplexity(tiny_model_dir, capsys):
    assert (
        main(
            ["eval", str(tiny_model_dir), "--data", str(tiny_model_dir.parent / "text.txt"), "--seqlen", "32"]
        )
        == 0
    )
    out = capsys.readouterr().out
    ppl = float(out.split("perplexity")[1].split()[0])
    assert 1.0 < ppl < 400.0  # a random model: near-uniform over the 300 tokens
    assert "tokens" in out and "time" in out


def test_generate_is_deterministic(tiny_model_dir, capsys):
    args = ["generate", str(tiny_model_dir), "--prompt", "And it came", "-n", "8"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("And it came")


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "sparsamba", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("what", ["no_config", "empty_data", "short_data", "missing_model"])
def test_bad_input_is_one_line_and_exit_1(tiny_model_dir, tmp_path, what):
    model, data = str(tiny_model_dir), str(tiny_model_dir.parent / "text.txt")
    if what == "no_config":
        bad = tmp_path / "m"
        bad.mkdir()
        (bad / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
        model, expect = str(bad), "no config.json"
    elif what == "empty_data":
        data = str(tmp_path / "empty.txt")
        (tmp_path / "empty.txt").write_text("")
        expect = "the data is empty"
    elif what == "short_data":
        data = str(tmp_path / "short.txt")
        (tmp_path / "short.txt").write_text("In the beginning")
        expect = "fewer than one window of 256"
    else:
        model, expect = str(tmp_path / "does" / "not" / "exist"), "no such directory"
    r = _run("eval", model, "--data", data)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("sparsamba eval: error:")]
    assert len(lines) == 1 and expect in lines[0], r.stderr


def test_debug_shows_traceback(tmp_path):
    r = _run("--debug", "eval", str(tmp_path))
    assert r.returncode != 0 and "Traceback" in r.stderr and "SparsambaError" in r.stderr


@pytest.fixture
def train_data(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    text = (tiny_model_dir.parent / "text.txt").read_text()
    (data / "train.txt").write_text(text)
    (data / "heldout.txt").write_text(text[:2000])
    return data


def test_train_tiny_writes_a_loadable_model(tmp_path, train_data):
    from sparsamba import load_model
    from sparsamba.model.train_tiny import TrainConfig, train_tiny

    tc = TrainConfig(
        vocab_size=300, hidden_size=16, num_hidden_layers=1, steps=3, batch=2, seqlen=16, warmup=1
    )
    summary = train_tiny(train_data, tmp_path / "out", tc, log=lambda *_: None)
    m = load_model(tmp_path / "out")
    assert m.config.vocab_size == 300 and summary["history"][-1]["step"] == 3
    assert json.loads((tmp_path / "out" / "training.json").read_text())["train_config"]["steps"] == 3


def test_train_tiny_is_deterministic(tmp_path, train_data):
    from safetensors.torch import load_file

    from sparsamba.model.train_tiny import TrainConfig, train_tiny

    tc = TrainConfig(
        vocab_size=300, hidden_size=16, num_hidden_layers=1, steps=4, batch=2, seqlen=16, warmup=1
    )
    for run in ("a", "b"):
        train_tiny(train_data, tmp_path / run, tc, log=lambda *_: None)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_version_and_help_show_every_default(capsys):
    from sparsamba import __version__
    from sparsamba.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sparsamba {__version__}"
    # every option of every command has help text, and a non-trivial default is shown in it
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, cmd in sub.choices.items():
        for action in cmd._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
        text = cmd.format_help()
        for action in cmd._actions:
            if action.option_strings and action.default not in (None, False) and action.default != "==SUPPRESS==":
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_streamed_text_equals_the_whole_decode(tiny_model_dir):
    """run's streaming prints each token's text once, never decoding the whole sequence again, and
    the pieces add up to the full decode (multi-byte characters held back until complete)."""
    from sparsamba.cli import TextStream
    from sparsamba.model.hf import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    rng = __import__("random").Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 40))]
        s = TextStream(tok)
        text = "".join(s.push(t) for t in ids) + s.flush()
        assert text == tok.decode(ids)


def test_engine_commands_default_to_the_embedded_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSAMBA_CACHE", str(tmp_path / "cache"))
    assert main(["run", "-n", "4", "--prompt", "And God said"]) == 0
    assert capsys.readouterr().out.startswith("And God said")
    assert len(list((tmp_path / "cache").glob("*.gguf"))) == 1  # compiled once, then reused
    assert main(["bench", "-p", "8", "-n", "4", "-r", "1", "-t", "1", "--stages"]) == 0
    out = capsys.readouterr().out
    assert "| kjv-mamba-tiny" in out and "where a decode step's time goes" in out and "| head |" in out
    assert main(["compile", "-o", str(tmp_path / "e.gguf"), "--dtype", "int8"]) == 0
    assert (tmp_path / "e.gguf").is_file()


def test_sparsamba_run_is_on_path(tmp_path, monkeypatch):
    """pip puts a sparsamba-run command beside sparsamba; it runs the bundled C program."""
    import shutil
    from pathlib import Path

    exe = shutil.which("sparsamba-run", path=str(Path(sys.executable).parent))
    assert exe, "sparsamba-run is not installed beside the Python that runs the tests"
    p = subprocess.run([exe, str(tmp_path / "missing.gguf")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "missing.gguf" in p.stderr and "cannot open" in p.stderr, p.stderr


def test_the_readme_lists_every_command_as_the_parser_does():
    """The README's table of commands is made from the parser; a command added without it fails here
    (python scripts/readme_commands.py rewrites it)."""
    from pathlib import Path

    from sparsamba.cli import command_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert command_table() in readme, "README.md's table of commands is stale: run scripts/readme_commands.py"


def test_bench_warns_when_sparsity_costs_speed():
    from sparsamba.cli import BenchRow, slower_despite_fewer_bytes

    shape = (768, 24, 50280)
    dense = BenchRow("dense.gguf", 1, shape, 1000, 50.0, "avx2")
    fast = BenchRow("c4-50.gguf", 1, shape, 600, 70.0, "avx2")
    slow = BenchRow("c4-70.gguf", 1, shape, 400, 45.0, "avx2")
    other = BenchRow("other.gguf", 1, (1024, 48, 50280), 300, 10.0, "avx2")
    warnings = slower_despite_fewer_bytes([dense, fast, slow, other])
    assert len(warnings) == 2 and all(w.startswith("warning: c4-70.gguf decodes slower") for w in warnings)
    assert "60% fewer bytes" in warnings[0] and "compute-bound" in warnings[0]
    assert slower_despite_fewer_bytes([dense, fast]) == []
