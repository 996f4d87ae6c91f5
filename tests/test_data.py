import gzip
import json
import math

import pytest
import torch

from sparsamba import SparsambaError
from sparsamba.eval.data import calibration_windows, eval_windows, read_text, tokenize
from sparsamba.eval.perplexity import perplexity, unigram_perplexity


def test_read_formats(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("gamma")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "delta"}) + "\n\n" + json.dumps({"text": "eps"}) + "\n"
    )
    assert read_text(tmp_path / "a.txt") == "alpha beta"
    assert read_text(tmp_path / "b.txt.gz") == "gamma"
    assert read_text(tmp_path / "c.jsonl") == "delta\n\neps"
    assert read_text(tmp_path) == "alpha beta\n\ngamma\n\ndelta\n\neps"  # folder: sorted, joined


@pytest.mark.parametrize(
    "name,content,msg",
    [
        ("empty.txt", "  \n", "empty"),
        ("bad.jsonl", '{"txt": 1}\n', r"bad.jsonl:1: not a JSON object with a \"text\" field"),
        ("bin.txt", b"\xff\xfe\x00bad", "not UTF-8"),
    ],
)
def test_bad_files(tmp_path, name, content, msg):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SparsambaError, match=msg):
        read_text(p)


def test_missing_file(tmp_path):
    with pytest.raises(SparsambaError, match="no such file"):
        read_text(tmp_path / "x.txt")


def test_windows_are_deterministic_and_in_range():
    ids = torch.arange(1000)
    a = calibration_windows(ids, 16, 32, seed=3)
    b = calibration_windows(ids, 16, 32, seed=3)
    c = calibration_windows(ids, 16, 32, seed=4)
    assert a.shape == (16, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 31, dtype=torch.long))  # contiguous slices
    e = eval_windows(ids, 300)
    assert e.shape == (3, 300) and torch.equal(e.flatten(), ids[:900])  # tail dropped, no overlap


def test_window_longer_than_data():
    with pytest.raises(SparsambaError, match="fewer than one window of 64"):
        calibration_windows(torch.arange(10), 4, 64, source="calib.txt")
    with pytest.raises(SparsambaError, match="calib.txt: 10 tokens"):
        eval_windows(torch.arange(10), 64, source="calib.txt")


def test_tokenize_accepts_both_tokenizer_kinds():
    class Plain:
        def encode(self, s):
            return [ord(c) for c in s]

    assert tokenize("ab", Plain()).tolist() == [97, 98]


def test_perplexity_of_uniform_model_is_vocab_size():
    V = 11

    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, V)

    windows = torch.randint(0, V, (5, 9))
    r = perplexity(Uniform(), windows, batch_size=2, progress=False)
    assert math.isclose(r.perplexity, V, rel_tol=1e-6) and r.tokens == 5 * 8 and r.windows == 5


def test_unigram_perplexity_matches_entropy():
    train = torch.tensor([0, 0, 0, 1])  # add-one smoothing over V=2: p = (4/6, 2/6)
    ev = torch.tensor([[5, 0, 1]])  # predicted positions: 0 and 1 (the first token is context)
    want = math.exp(-(math.log(4 / 6) + math.log(2 / 6)) / 2)
    assert math.isclose(unigram_perplexity(train, ev[:, :] % 2, 2), want, rel_tol=1e-9)
