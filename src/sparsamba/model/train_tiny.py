"""Train the small embedded model (``sparsamba train-tiny``): a byte-level BPE tokenizer and a Mamba-1
(or, with ``arch="mamba2"``, a Mamba-2) language model on the shipped KJV splits, deterministic given the
seed, on a CPU in well under an hour.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..eval.data import eval_windows, read_text, tokenize
from .mamba1 import Mamba1Config, Mamba1LM
from .mamba2 import Mamba2Config, Mamba2LM

EOS = "<|endoftext|>"


@dataclass
class TrainConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    state_size: int = 16
    steps: int = 1500
    batch: int = 8
    seqlen: int = 128
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 1  # 2 OpenMP threads were slower than 1 with anything else running
    arch: str = "mamba"  # "mamba2": a Mamba-2 of the same width and depth (heads of head_dim, one group)
    head_dim: int = 32  # Mamba-2 only


def train_tokenizer(text: str, vocab_size: int):
    """A GPT-2-style byte-level BPE (what llama.cpp calls the "gpt2" tokenizer model), with
    ``<|endoftext|>`` as id 0 for bos / eos / pad as in the Mamba (GPT-NeoX) vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


def _tokenizer_config() -> dict:
    # lets transformers' AutoTokenizer (and so lm-eval) load tokenizer.json as it is
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "model_max_length": 1_000_000,
        "add_prefix_space": False,
    }


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # matrices decay; norms, biases, A_log, D and the SSM's own vectors do not
        (decay if p.dim() >= 2 and "A_log" not in name and "conv1d" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def _heldout_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1])
        tot += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    model.train()
    return tot / n


def train_tiny(
    data_dir: str | Path, out: str | Path, tc: TrainConfig, overwrite: bool = False, log=print
) -> dict:
    """Train tokenizer + model from ``data_dir`` (train.txt[.gz], heldout.txt) and write an HF-format
    directory to ``out``. Returns a summary (times, losses)."""
    from ..progress import progress
    from .hf import save_model

    t0 = time.time()
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    torch.set_flush_denormal(True)  # decays of the scan drift into denormals, slow on x86
    data_dir = Path(data_dir)
    train_path = next(
        (p for p in (data_dir / "train.txt.gz", data_dir / "train.txt") if p.exists()), data_dir / "train.txt"
    )
    text = read_text(train_path)
    tok = train_tokenizer(text, tc.vocab_size)
    ids = tokenize(text, tok)
    held = eval_windows(tokenize(read_text(data_dir / "heldout.txt"), tok), tc.seqlen + 1, max_windows=64)
    log(
        f"tokenizer: {tok.get_vocab_size()} tokens; train split {ids.numel()} tokens ({time.time() - t0:.1f} s)"
    )

    common = dict(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        num_hidden_layers=tc.num_hidden_layers,
        state_size=tc.state_size,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    if tc.arch == "mamba2":
        di = 2 * tc.hidden_size
        cfg = Mamba2Config(
            **common, head_dim=tc.head_dim, num_heads=di // tc.head_dim, n_groups=1, chunk_size=64, tie_word_embeddings=True
        )
        model = Mamba2LM(cfg)
    elif tc.arch == "mamba":
        cfg = Mamba1Config(**common)
        model = Mamba1LM(cfg)
    else:
        raise ValueError(f"arch {tc.arch!r}: 'mamba' or 'mamba2'")
    with torch.no_grad():
        for layer in model.backbone.layers:  # GPT-2's residual scaling, as mamba_ssm does
            layer.mixer.out_proj.weight /= math.sqrt(cfg.num_hidden_layers)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, {cfg}")
    opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < tc.warmup:
            return tc.lr * (step + 1) / tc.warmup
        t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
        return tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(tc.seed)
    model.train()
    history = []
    t_train = time.time()
    bar = progress(range(tc.steps), desc="train", unit="steps")
    for step in bar:
        starts = torch.randint(0, ids.numel() - tc.seqlen - 1, (tc.batch,), generator=g)
        w = torch.stack([ids[s : s + tc.seqlen + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix_str(f"loss {loss.item():.3f}")
        if (step + 1) % 250 == 0 or step + 1 == tc.steps:
            hl = _heldout_loss(model, held)
            history.append({"step": step + 1, "train_loss": loss.item(), "heldout_loss": hl})
            log(
                f"step {step + 1}: train loss {loss.item():.3f}, held-out loss {hl:.3f} (ppl {math.exp(hl):.1f})"
            )
    train_s = time.time() - t_train

    out = Path(out)
    tmp_tok = Path(str(out) + ".tokenizer")
    tmp_tok.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_tok / "tokenizer.json"))
    (tmp_tok / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")
    summary = {
        "train_config": asdict(tc),
        "parameters": n_params,
        "train_tokens": ids.numel(),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "history": history,
        "torch": torch.__version__,
    }
    save_model(
        model.eval(),
        out,
        tokenizer_dir=tmp_tok,
        extra_files={"training.json": json.dumps(summary, indent=2) + "\n"},
        overwrite=overwrite,
    )
    for f in tmp_tok.iterdir():
        f.unlink()
    tmp_tok.rmdir()
    log(f"wrote {out} in {summary['total_seconds']} s")
    return summary
