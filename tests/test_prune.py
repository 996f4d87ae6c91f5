"""The pruning driver end to end on small random models: structure, exact targets, the sequential
calibration flow, learning's soft masks, and the command's output and refusals."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import quick_prune_args

from sparsamba import SparsambaError, load_model
from sparsamba.model.mamba1 import Mamba1Config, Mamba1LM
from sparsamba.model.mamba2 import Mamba2Config, Mamba2LM
from sparsamba.prune.calibrate import BlockWalker, collect_stats, prunable_layers
from sparsamba.prune.latency import cost_model_table, expected_latency
from sparsamba.prune.learn import LearnConfig, _row_probs, _soft_mask, make_choice
from sparsamba.prune.methods import calibration_loss
from sparsamba.prune.pattern import check_pattern, group_masks, parse_pattern, removed_per_row
from sparsamba.prune.run import PruneConfig, prune_model

FAST = LearnConfig(steps=6, batch_size=2)


def _mamba1(seed=0):
    torch.manual_seed(seed)
    return Mamba1LM(Mamba1Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)).eval()


def _mamba2(seed=0):
    torch.manual_seed(seed)
    cfg = Mamba2Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        head_dim=8,
        num_heads=8,
        n_groups=1,
        chunk_size=16,
    )
    return Mamba2LM(cfg).eval()


def _windows(n=8, l=24, seed=1):
    return torch.randint(0, 64, (n, l), generator=torch.Generator().manual_seed(seed))


def test_prunable_layers_follow_the_design():
    names = [n for block in prunable_layers(_mamba1()) for n, _ in block]
    assert names[:4] == [f"backbone.layers.0.mixer.{p}" for p in ("in_proj", "x_proj", "dt_proj", "out_proj")]
    assert len(names) == 8
    names2 = [n.rsplit(".", 1)[1] for block in prunable_layers(_mamba2()) for n, _ in block]
    assert names2 == ["in_proj", "out_proj"] * 2


def test_cached_walk_equals_hooked_full_forward():
    """The cached block-by-block walk gathers the same statistics as hooks on the full forward."""
    m, w = _mamba1(), _windows()
    layers = prunable_layers(m)
    walker = BlockWalker(m, w, batch_size=3)
    for b, block in enumerate(layers):
        got = walker.stats(b, block)
        want = collect_stats(lambda: m(w), block)
        for name, _ in block:
            assert torch.allclose(got[name].H, want[name].H, rtol=1e-5, atol=1e-6), name
            assert got[name].tokens == want[name].tokens == w.numel()
        walker.advance(b)


@pytest.mark.parametrize(
    "method,pattern,sparsity",
    [
        ("magnitude", "2:4", None),
        ("wanda", "4:8", None),
        ("wanda", "unstructured", 0.5),
        ("sparsegpt", "2:4", None),
        ("sparsegpt", "unstructured", 0.6),
        ("c4", "c4n1", None),
        ("c4", "c4n3", None),
    ],
)
@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_methods_produce_their_pattern(method, pattern, sparsity, arch):
    m = _mamba1() if arch == "mamba" else _mamba2()
    rep = prune_model(
        m, _windows(), PruneConfig(method=method, pattern=pattern, sparsity=sparsity), progress=False
    )
    p = parse_pattern(pattern)
    for block in prunable_layers(m):
        for name, mod in block:
            check_pattern(mod.weight, p, name=name)
    want = sparsity if sparsity is not None else 1 - p.n_kept / p.group
    assert abs(rep["total"]["sparsity"] - want) < 0.01
    assert rep["total"]["weights"] == sum(
        mod.weight.numel() for block in prunable_layers(m) for _, mod in block
    )


def test_compensation_lowers_reconstruction_error():
    w = _windows()
    errs = {}
    for comp in (False, True):
        m = _mamba1()
        rep = prune_model(
            m, w, PruneConfig(method="c4", pattern="c4n2", compensate=comp, select="score"), progress=False
        )
        errs[comp] = rep["reconstruction_error"]
    for name in errs[True]:
        assert errs[True][name] <= errs[False][name] + 1e-7, name
    assert sum(errs[True].values()) < 0.9 * sum(errs[False].values())


def test_soft_mask_is_the_expected_mask():
    """W ⊙ soft_mask equals Σ_n p_n (W ⊙ M_n), computed with the five masks explicitly."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 6)
    scores = torch.rand(6, 10)
    c = make_choice("x", lin, 0, scores)
    c.logits = torch.randn(6, 5)
    p = _row_probs(c, 0.7, 1)
    M = group_masks(scores).float()  # (5, out, in)
    want = torch.einsum("rn,nrj->rj", p, M)
    assert torch.allclose(_soft_mask(c, p), want, atol=1e-6)


@pytest.mark.parametrize("scope", ["block", "global"])
@pytest.mark.parametrize("target", [0.3, 0.7])
def test_learned_c4_meets_sparsity_exactly(scope, target):
    m = _mamba1()
    rep = prune_model(
        m,
        _windows(),
        PruneConfig(method="c4", pattern="c4", sparsity=target, scope=scope, learn=FAST),
        progress=False,
        log=lambda *_: None,
    )
    layers = prunable_layers(m)
    # exact to one row of the widest layer in the scope
    tol = max(mod.in_features for block in layers for _, mod in block) / rep["total"]["weights"] * len(layers)
    assert abs(rep["total"]["sparsity"] - target) <= tol
    if scope == "block":
        for block in layers:
            z = sum(int((mod.weight == 0).sum()) for _, mod in block)
            n = sum(mod.weight.numel() for _, mod in block)
            assert abs(z / n - target) <= max(mod.in_features for _, mod in block) / n + 1e-9
    for block in layers:  # every row has one n
        for name, mod in block:
            check_pattern(mod.weight, parse_pattern("c4"), n_removed=removed_per_row(mod.weight), name=name)
    assert sum(rep["total"]["n_hist"]) == sum(mod.out_features for block in layers for _, mod in block)


def test_latency_target_is_met():
    m = _mamba1()
    layers = prunable_layers(m)
    table = cost_model_table([(mod.out_features, mod.in_features) for b in layers for _, mod in b])
    dense = expected_latency(
        table,
        {
            n: (mod.out_features, mod.in_features, torch.zeros(mod.out_features))
            for b in layers
            for n, mod in b
        },
    )
    goal = 0.5 * dense
    prune_model(
        m,
        _windows(),
        PruneConfig(method="c4", pattern="c4", latency=goal, latency_table=table, learn=FAST),
        progress=False,
        log=lambda *_: None,
    )
    got = expected_latency(
        table,
        {n: (mod.out_features, mod.in_features, removed_per_row(mod.weight)) for b in layers for n, mod in b},
    )
    biggest_row = max(table["entries"], key=lambda e: e["seconds"] / e["out"])
    assert abs(got - goal) <= biggest_row["seconds"] / biggest_row["out"] + 1e-12


def test_loss_budget_is_respected():
    m, w = _mamba1(), _windows()
    base = calibration_loss(m, w)
    rep = prune_model(
        m,
        w,
        PruneConfig(method="c4", pattern="c4", loss_budget=0.02, compensate=False, learn=FAST),
        progress=False,
        log=lambda *_: None,
    )
    assert (calibration_loss(m, w) - base) / base <= 0.02 + 1e-6
    assert rep["total"]["sparsity"] > 0.0


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(pattern="c4"), "needs a target"),
        (dict(pattern="c4n2", sparsity=0.3), "fixes sparsity at 50%"),
        (dict(pattern="c4", sparsity=1.0), r"in \[0, 1\)"),
        (dict(method="wanda", pattern="c4", sparsity=0.5), "needs --method c4"),
        (dict(method="sparsegpt", pattern="unstructured"), "needs --sparsity"),
        (dict(pattern="c4", latency=1.0), "needs --latency-table"),
        (dict(pattern="c4n5"), "c4n1, c4n2 or c4n3"),
    ],
)
def test_bad_configs(kw, msg):
    with pytest.raises(SparsambaError, match=msg):
        prune_model(_mamba1(), _windows(), PruneConfig(**kw), progress=False)


def test_nan_weight_is_refused_before_any_change():
    m = _mamba1()
    m.backbone.layers[1].mixer.out_proj.weight.data[0, 0] = float("nan")
    before = m.backbone.layers[0].mixer.in_proj.weight.clone()
    with pytest.raises(SparsambaError, match="NaN or inf"):
        prune_model(m, _windows(), PruneConfig(method="wanda", pattern="2:4"), progress=False)
    assert torch.equal(before, m.backbone.layers[0].mixer.in_proj.weight)


def _llama(layers: int):
    """A random LLaMA-style transformers model behind the ids -> logits adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsamba.model.hf import LogitsOnly

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LogitsOnly(LlamaForCausalLM(cfg).eval())


def test_llama_style_model_from_transformers():
    m = _llama(2)
    w = _windows()
    dense = m(w)
    rep = prune_model(m, w, PruneConfig(method="sparsegpt", pattern="2:4"), progress=False)
    assert len(rep["layers"]) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert abs(rep["total"]["sparsity"] - 0.5) < 1e-9
    assert not torch.allclose(m(w), dense)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sparsamba", *args], capture_output=True, text=True, timeout=300
    )


def test_prune_command_writes_a_model_transformers_loads(tiny_model_dir, tmp_path):
    from transformers import MambaForCausalLM

    out = tmp_path / "pruned"
    calib = tiny_model_dir.parent / "text.txt"
    r = _cli(
        "prune",
        str(tiny_model_dir),
        "--method",
        "c4",
        "--pattern",
        "c4",
        "--sparsity",
        "0.5",
        "--steps",
        "3",
        "--calib",
        str(calib),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "-o",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "sparsity.json").read_text())
    assert rep["method"] == "c4" and rep["pattern"] == "c4" and abs(rep["total"]["sparsity"] - 0.5) < 0.02
    hf = MambaForCausalLM.from_pretrained(out).eval()
    ours = load_model(out)
    ids = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)
    w = ours.backbone.layers[0].mixer.in_proj.weight
    check_pattern(w, parse_pattern("c4"), n_removed=removed_per_row(w), name="in_proj")


@pytest.mark.parametrize("what", ["exists", "empty_calib", "short_calib", "bad_recipe"])
def test_prune_command_refuses_bad_input_and_writes_nothing(tiny_model_dir, tmp_path, what):
    out = tmp_path / "out"
    calib = tmp_path / "calib.txt"
    calib.write_text((tiny_model_dir.parent / "text.txt").read_text())
    extra = []
    if what == "exists":
        out.mkdir()
        expect = "already exists"
    elif what == "empty_calib":
        calib.write_text("")
        expect = "empty"
    elif what == "short_calib":
        calib.write_text("And it came to pass")
        expect = "fewer than one window"
    else:
        rec = tmp_path / "r.toml"
        rec.write_text('[prune]\nmethod = "wanda"\npatern = "2:4"\n')
        extra, expect = ["--recipe", str(rec)], "unknown recipe keys"
    r = _cli(*quick_prune_args(tiny_model_dir, calib, out, seqlen=64), *extra)
    assert r.returncode == 1 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["calib.txt", "r.toml"][: 2 if what == "bad_recipe" else 1] + (["out"] if what == "exists" else [])
    )
    if what == "exists":
        assert not any(out.iterdir())


def test_row_blocks_share_one_n():
    m = _mamba1()
    learn = LearnConfig(steps=4, batch_size=2, row_block=4)
    prune_model(
        m,
        _windows(),
        PruneConfig(method="c4", pattern="c4", sparsity=0.5, learn=learn),
        progress=False,
        log=lambda *_: None,
    )
    for block in prunable_layers(m):
        for name, mod in block:
            n = removed_per_row(mod.weight)
            full = n[: len(n) // 4 * 4].view(-1, 4)
            assert (full == full[:, :1]).all(), name


def test_generate_works_for_models_without_a_recurrent_step():
    from sparsamba.eval.generate import generate

    m = _llama(1)
    out = generate(m, [1, 2, 3], 5)
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[3:]
