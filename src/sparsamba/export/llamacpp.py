"""Export an HF-format Mamba-1 / Mamba-2 directory (dense, or pruned = dense with exact zeros) as a plain
dense GGUF of architecture ``mamba`` / ``mamba2`` that llama.cpp runs: the speed baseline, same weights.

The layout is llama.cpp's (see shared/notes/llamacpp.md and llama.cpp's ``llama_model_mamba[2]``
loaders). Shapes below are numpy shapes; a GGUF stores ggml's ``ne``, the same dims reversed.

    GGUF tensor               Mamba-1                         Mamba-2
    token_embd.weight         (V, d)                          (V, d)
    blk.i.attn_norm.weight    (d,)                            (d,)
    blk.i.ssm_in.weight       (2·di, d)                       (2·di + 2·g·N + h, d)   [z | xBC | dt]
    blk.i.ssm_conv1d.weight   (di, K)    squeezed (di,1,K)    (di + 2·g·N, K)
    blk.i.ssm_conv1d.bias     (di,)                           (di + 2·g·N,)
    blk.i.ssm_x.weight        (R + 2·N, di)                   -
    blk.i.ssm_dt.weight       (di, R)                         -
    blk.i.ssm_dt.bias         (di,)                           (h,)         = dt_bias
    blk.i.ssm_a               (di, N)    = -exp(A_log)        (h, 1)       = -exp(A_log)
    blk.i.ssm_d               (di,)                           (h, 1)
    blk.i.ssm_norm.weight     -                               (g, di/g)    the gated norm, per group
    blk.i.ssm_out.weight      (d, di)                         (d, di)
    output_norm.weight        (d,)                            (d,)
    output.weight             (V, d), only when untied        (V, d), only when untied

Norms, conv, A, D and biases stay F32 whatever the dtype (ggml's ssm_conv / ssm_scan read them as
F32); the matrices (embedding, ssm_in, ssm_x, ssm_dt, ssm_out, output) take the requested dtype.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import formats
from ..errors import SparsambaError
from ..outputs import check_output

# Mamba has no positional limit; llama.cpp's own converter writes this "arbitrary" 2**20 too
CONTEXT_LENGTH = 2**20
# llama.cpp's name for a GPT-2 pre-tokenizer (GGUF key tokenizer.ggml.pre). Our tokenizers are
# tokenizers' ByteLevel(use_regex=True, add_prefix_space=False), which splits text with GPT-2's
# regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+); llama.cpp
# maps "gpt-2" to LLAMA_VOCAB_PRE_TYPE_GPT2, its implementation of that regex (its converter writes
# "gpt-2" for openai-community/gpt2). An unknown name is a load error in llama.cpp, and "default"
# would split differently: its default BPE pre-tokenizer cuts runs of punctuation and digits apart.
TOKENIZER_PRE = "gpt-2"
PAD_TOKEN = "[PAD{}]"  # placeholder rows past the tokenizer, as llama.cpp's converter names them


def _check_runnable(cfg, where: Path) -> None:
    """Refuse configurations that llama.cpp's mamba / mamba2 graph cannot compute as our reference does."""
    pre = f"{where}: llama.cpp cannot run this model: "
    # (llama.cpp's Mamba-2 loader checks no expand; its converter still asserts 2, so that is untested)
    if cfg.model_type == "mamba" and cfg.expand != 2:
        raise SparsambaError(
            f"{pre}its Mamba-1 supports expand = 2 only (d_inner = 2·d_model), this model has expand = "
            f"{cfg.expand}; benchmark it with sparsamba's own engine instead"
        )
    if cfg.use_bias:
        raise SparsambaError(
            f"{pre}in_proj / out_proj have biases (use_bias = true) and llama.cpp's Mamba has no slot for them"
        )
    if cfg.model_type == "mamba2":
        if not cfg.rms_norm:
            raise SparsambaError(
                f"{pre}rms_norm = false (no gated norm before out_proj); llama.cpp's Mamba-2 always applies it"
            )
        if cfg.time_step_limit != (0.0, float("inf")):
            raise SparsambaError(
                f"{pre}time_step_limit = {list(cfg.time_step_limit)} clamps Δ, and llama.cpp's Mamba-2 never "
                "clamps it: the exported model would compute something else"
            )


# ----------------------------------------------------------------------------------------------
# Tokenizer section


def _read_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """tokenizer.json -> (tokens in id order padded to ``vocab_size``, their gguf token types, merges)."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise SparsambaError(
            f"{model_dir}: no tokenizer.json; a GGUF for llama.cpp carries its tokenizer, so add the model's "
            "tokenizer.json to the directory"
        )
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model, pre = tj["model"], tj.get("pre_tokenizer") or {}
        vocab = model["vocab"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SparsambaError(f"{path}: not a valid tokenizers file ({type(e).__name__}: {e})") from None
    if (
        model.get("type") != "BPE"
        or not isinstance(vocab, dict)
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space", False)
    ):
        raise SparsambaError(
            f"{path}: export-gguf writes GPT-2-style byte-level BPE tokenizers only (model BPE, pre-tokenizer "
            f"ByteLevel with its regex and no prefix space), this one is model {model.get('type')!r}, "
            f"pre-tokenizer {pre.get('type')!r}; llama.cpp would tokenize text differently"
        )

    T = gguf.TokenType
    by_id: dict[int, tuple[str, int]] = {i: (tok, T.NORMAL) for tok, i in vocab.items()}
    for a in tj.get("added_tokens") or []:
        by_id[a["id"]] = (a["content"], T.CONTROL if a.get("special") else T.USER_DEFINED)
    top = max(by_id, default=-1)
    if top >= vocab_size:
        raise SparsambaError(
            f"{path}: the tokenizer has token id {top} but the model has {vocab_size} embedding rows; "
            "the tokenizer does not belong to this model"
        )
    tokens, types = [], []
    for i in range(vocab_size):  # llama.cpp needs one token per embedding row
        tok, ty = by_id.get(i, (PAD_TOKEN.format(i), T.UNUSED))
        tokens.append(tok)
        types.append(int(ty))

    merges = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2 or any(" " in p for p in pair):
            # a byte-level vocabulary never holds a raw space; GGUF merges are "left right" strings
            raise SparsambaError(f"{path}: merge {m!r} is not a pair of byte-level tokens")
        merges.append(f"{pair[0]} {pair[1]}")
    return tokens, types, merges


def _add_bos_eos(model_dir: Path) -> tuple[bool, bool]:
    """Whether the tokenizer adds BOS / EOS itself (tokenizer_config.json); byte-level BPE adds neither."""
    p = model_dir / "tokenizer_config.json"
    try:
        tc = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        tc = {}
    return bool(tc.get("add_bos_token", False)), bool(tc.get("add_eos_token", False))


@dataclass
class GGUFTokenizer:
    """The tokenizer section of a GGUF: llama.cpp's ``tokenizer.ggml.*`` keys, and the HF tokenizer.json
    text (``tokenizer.huggingface.json``) where the file carries it."""

    tokens: list[str]  # one per embedding row
    types: list[int]  # gguf.TokenType of each
    merges: list[str]  # "left right"
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos: bool
    add_eos: bool
    hf_json: str | None = None


def read_tokenizer(model_dir: Path, cfg) -> GGUFTokenizer:
    """The tokenizer section for ``model_dir`` (tokenizer.json, tokenizer_config.json, ids from ``cfg``)."""
    tokens, types, merges = _read_vocab(model_dir, cfg.vocab_size)
    add_bos, add_eos = _add_bos_eos(model_dir)
    ids = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}
    for what, tid in ids.items():
        if tid is not None and not 0 <= tid < len(tokens):
            raise SparsambaError(f"{model_dir / 'config.json'}: {what}_token_id {tid} is outside the vocabulary")
    return GGUFTokenizer(tokens, types, merges, ids["bos"], ids["eos"], ids["pad"], add_bos, add_eos)


def add_tokenizer(w, tok: GGUFTokenizer) -> None:
    """Write ``tok`` into the ``gguf.GGUFWriter`` ``w``."""
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(TOKENIZER_PRE)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    w.add_token_merges(tok.merges)
    for add, tid in (
        (w.add_bos_token_id, tok.bos_token_id),
        (w.add_eos_token_id, tok.eos_token_id),
        (w.add_pad_token_id, tok.pad_token_id),
    ):
        if tid is not None:
            add(tid)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.hf_json is not None:
        w.add_string("tokenizer.huggingface.json", tok.hf_json)


# ----------------------------------------------------------------------------------------------
# Tensors: the name map, HF names on the left, llama.cpp's on the right


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _gguf_tensors(model, dtype: str) -> list[tuple[str, np.ndarray]]:
    cfg = model.config
    sd = model.state_dict()
    out: list[tuple[str, np.ndarray]] = []

    def mat(name: str, key: str) -> None:
        w = _f32(sd[key])
        if dtype == "f16":
            if np.abs(w).max(initial=0.0) > formats.F16_MAX:
                raise SparsambaError(f"{key} has values beyond the fp16 range; export with --dtype f32")
            w = w.astype(formats.F16.numpy)
        out.append((name, w))

    def vec(name: str, t: torch.Tensor) -> None:
        out.append((name, _f32(t)))

    mat("token_embd.weight", "backbone.embeddings.weight")
    for i in range(cfg.num_hidden_layers):
        p, b = f"backbone.layers.{i}.", f"blk.{i}."
        m = p + "mixer."
        A = -torch.exp(sd[m + "A_log"].float())  # llama.cpp stores A itself
        conv_w = sd[m + "conv1d.weight"]  # (C, 1, K)
        # a missing conv bias is a zero one; llama.cpp requires the tensor
        conv_b = sd.get(m + "conv1d.bias", torch.zeros(conv_w.shape[0]))
        vec(b + "attn_norm.weight", sd[p + "norm.weight"])
        mat(b + "ssm_in.weight", m + "in_proj.weight")
        vec(b + "ssm_conv1d.weight", conv_w[:, 0, :])  # (C, K)
        vec(b + "ssm_conv1d.bias", conv_b)
        if cfg.model_type == "mamba":
            mat(b + "ssm_x.weight", m + "x_proj.weight")
            mat(b + "ssm_dt.weight", m + "dt_proj.weight")
            vec(b + "ssm_dt.bias", sd[m + "dt_proj.bias"])
            vec(b + "ssm_a", A)  # (di, N)
            vec(b + "ssm_d", sd[m + "D"])  # (di,)
        else:
            g, di = cfg.n_groups, cfg.intermediate_size
            vec(b + "ssm_dt.bias", sd[m + "dt_bias"])  # (h,)
            vec(b + "ssm_a", A[:, None])  # (h, 1): ne {1, h}, what the loader asks for
            vec(b + "ssm_d", sd[m + "D"][:, None])  # (h, 1)
            vec(b + "ssm_norm.weight", sd[m + "norm.weight"].reshape(g, di // g))  # one row per group
        mat(b + "ssm_out.weight", m + "out_proj.weight")
    vec("output_norm.weight", sd["backbone.norm_f.weight"])
    if not cfg.tie_word_embeddings:  # absent = tied: llama.cpp reuses token_embd as the head
        mat("output.weight", "lm_head.weight")
    return out


# ----------------------------------------------------------------------------------------------
# Export


def export_gguf(
    model_dir: str | Path, out_path: str | Path, dtype: str = "f32", overwrite: bool = False
) -> Path:
    """Write ``out_path``: the model in ``model_dir`` as a dense llama.cpp GGUF (``mamba`` / ``mamba2``),
    matrices in ``dtype`` ("f32" or "f16"). Written to a temporary file beside it and renamed when
    complete, so a failure leaves nothing behind (and an old file untouched)."""
    import gguf

    from ..model.hf import build_model, load_state, read_config, read_weights, resolve

    fmt = formats.get(dtype, formats.LLAMACPP)
    out = Path(out_path)
    check_output(out, overwrite, file=True)
    d = resolve(model_dir)
    cfg = read_config(d)
    arch = cfg.model_type
    _check_runnable(cfg, d)  # refuse before reading any weights
    tok = read_tokenizer(d, cfg)
    model = build_model(cfg)
    load_state(model, read_weights(d), d)  # every name and shape checked against config.json
    tensors = _gguf_tensors(model, dtype)

    w = gguf.GGUFWriter(None, arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(d.resolve().name)
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(0)  # unused by Mamba; older llama.cpp loaders require both keys
    w.add_head_count(0)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_ssm_conv_kernel(cfg.conv_kernel)
    w.add_ssm_inner_size(cfg.intermediate_size)
    w.add_ssm_state_size(cfg.state_size)
    if arch == "mamba":
        w.add_ssm_time_step_rank(cfg.time_step_rank)
        w.add_ssm_dt_b_c_rms(False)  # true only for Falcon-Mamba's extra B/C/Δ norms
    else:
        w.add_ssm_time_step_rank(cfg.num_heads)  # llama.cpp's Mamba-2 reads the head count here
        w.add_ssm_group_count(cfg.n_groups)
    w.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    w.add_file_type(fmt.llama_ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    add_tokenizer(w, tok)
    for name, arr in tensors:
        w.add_tensor(name, arr)
    return write_gguf_atomically(w, out)


def write_gguf_atomically(w, out: Path) -> Path:
    """Write the filled ``gguf.GGUFWriter`` ``w`` to a temporary file beside ``out`` and rename it into
    place when complete, so a failure leaves nothing behind (and an old file untouched)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise SparsambaError(f"{out}: cannot write ({e}); check the folder") from None
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.chmod(0o666 & ~umask)  # mkstemp makes it owner-only; a model file is meant to be shared
        os.replace(tmp, out)
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SparsambaError(f"{out}: cannot write ({e}); check the folder and free space") from None
        raise
    return out


# ----------------------------------------------------------------------------------------------
# Reading back (tests, checks): GGUF -> HF config dict and HF-named state dict


def open_gguf(path: Path, what: str):
    """(reader, kv, tensors) of a GGUF: ``kv(key, required=True)`` reads a metadata value (a missing
    required key is an error saying the file is not a complete ``what``); ``tensors`` are torch
    copies out of the mmap, by name."""
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise SparsambaError(f"{path}: cannot read as GGUF ({e})") from None

    def kv(key: str, required: bool = True):
        f = r.fields.get(key)
        if f is None and required:
            raise SparsambaError(f"{path}: metadata key {key} is missing; not a complete {what}")
        return None if f is None else f.contents()

    return r, kv, {x.name: torch.from_numpy(np.array(x.data)) for x in r.tensors}


def read_gguf_dense(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A GGUF written by ``export_gguf`` (or llama.cpp's converter) -> (config.json-style dict, state
    dict in transformers' names). Tensors keep their stored dtype (F16 matrices come back fp16);
    A_log is recovered as log(-A), so it matches the original to float rounding, not bit for bit."""
    path = Path(path)
    r, kv, t = open_gguf(path, "llama.cpp Mamba GGUF")

    arch = kv("general.architecture", required=False)
    if arch not in ("mamba", "mamba2"):
        raise SparsambaError(f"{path}: architecture {arch!r}; read_gguf_dense reads 'mamba' and 'mamba2'")
    if "token_embd.weight" not in t:
        raise SparsambaError(f"{path}: no token_embd.weight; not a complete {arch} GGUF")
    d, di = kv(f"{arch}.embedding_length"), kv(f"{arch}.ssm.inner_size")
    # stored as float32: 1e-5 comes back as 9.99999975e-06; 7 digits give the decimal it was written from
    eps = float(f"{kv(f'{arch}.attention.layer_norm_rms_epsilon'):.7g}")
    cfg = {
        "model_type": arch,
        "vocab_size": int(t["token_embd.weight"].shape[0]),
        "hidden_size": d,
        "num_hidden_layers": kv(f"{arch}.block_count"),
        "state_size": kv(f"{arch}.ssm.state_size"),
        "conv_kernel": kv(f"{arch}.ssm.conv_kernel"),
        "expand": di // d,
        "layer_norm_epsilon": eps,
        "tie_word_embeddings": "output.weight" not in t,
        "use_bias": False,
        "use_conv_bias": True,
        "bos_token_id": kv("tokenizer.ggml.bos_token_id", required=False),
        "eos_token_id": kv("tokenizer.ggml.eos_token_id", required=False),
        "pad_token_id": kv("tokenizer.ggml.padding_token_id", required=False),
    }
    if arch == "mamba":
        cfg["time_step_rank"] = kv("mamba.ssm.time_step_rank")
    else:
        h = kv("mamba2.ssm.time_step_rank")
        cfg.update(num_heads=h, head_dim=di // h, n_groups=kv("mamba2.ssm.group_count"))

    try:
        sd = _hf_state(t, arch, cfg["num_hidden_layers"])
    except KeyError as e:
        raise SparsambaError(f"{path}: tensor {e} is missing; not a complete {arch} GGUF") from None
    return cfg, sd


def _hf_state(t: dict[str, torch.Tensor], arch: str, n_layer: int) -> dict[str, torch.Tensor]:
    sd = {
        "backbone.embeddings.weight": t["token_embd.weight"],
        "backbone.norm_f.weight": t["output_norm.weight"],
    }
    if "output.weight" in t:
        sd["lm_head.weight"] = t["output.weight"]
    for i in range(n_layer):
        p, b = f"backbone.layers.{i}.", f"blk.{i}."
        m = p + "mixer."
        sd[p + "norm.weight"] = t[b + "attn_norm.weight"]
        sd[m + "in_proj.weight"] = t[b + "ssm_in.weight"]
        sd[m + "conv1d.weight"] = t[b + "ssm_conv1d.weight"][:, None, :]
        sd[m + "conv1d.bias"] = t[b + "ssm_conv1d.bias"]
        sd[m + "A_log"] = torch.log(-t[b + "ssm_a"])
        sd[m + "out_proj.weight"] = t[b + "ssm_out.weight"]
        if arch == "mamba":
            sd[m + "x_proj.weight"] = t[b + "ssm_x.weight"]
            sd[m + "dt_proj.weight"] = t[b + "ssm_dt.weight"]
            sd[m + "dt_proj.bias"] = t[b + "ssm_dt.bias"]
            sd[m + "D"] = t[b + "ssm_d"]
        else:
            sd[m + "A_log"] = sd[m + "A_log"].flatten()
            sd[m + "D"] = t[b + "ssm_d"].flatten()
            sd[m + "dt_bias"] = t[b + "ssm_dt.bias"]
            sd[m + "norm.weight"] = t[b + "ssm_norm.weight"].flatten()
    return sd
