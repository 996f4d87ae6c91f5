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

from pathlib import Path

import numpy as np
import torch

from .. import formats
from ..errors import SparsambaError
from ..gguf_io import GGUFTokenizer, open_gguf, write_gguf_atomically
from ..model import names
from ..outputs import check_output

# Mamba has no positional limit; llama.cpp's own converter writes this "arbitrary" 2**20 too
CONTEXT_LENGTH = 2**20


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
# Tensors, by the name map of model/names.py


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _gguf_tensors(model, dtype: str) -> list[tuple[str, np.ndarray]]:
    cfg = model.config
    arch = cfg.model_type
    sd = model.state_dict()
    out: list[tuple[str, np.ndarray]] = []

    def add(name: str, suffix: str, key: str, t: torch.Tensor) -> None:
        w = _f32(t)
        if dtype == "f16" and suffix in names.MATRICES:
            if np.abs(w).max(initial=0.0) > formats.F16_MAX:
                raise SparsambaError(f"{key} has values beyond the fp16 range; export with --dtype f32")
            w = w.astype(formats.F16.numpy)
        out.append((name, w))

    def top(name: str) -> None:
        add(name, name, names.GLOBAL[name], sd[names.GLOBAL[name]])

    top("token_embd.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"backbone.layers.{i}."
        for suffix, hf in names.BLOCK[arch].items():
            if suffix in names.OPTIONAL:  # use_bias: refused by _check_runnable
                continue
            t = sd.get(p + hf)
            if t is None and suffix == "ssm_conv1d.bias":  # a missing conv bias is a zero one; llama.cpp requires it
                t = torch.zeros(sd[p + "mixer.conv1d.weight"].shape[0])
            add(f"blk.{i}.{suffix}", suffix, p + hf, names.to_gguf(suffix, t, arch, getattr(cfg, "n_groups", 1)))
    top("output_norm.weight")
    if not cfg.tie_word_embeddings:  # absent = tied: llama.cpp reuses token_embd as the head
        top("output.weight")
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
    tok = GGUFTokenizer.from_model_dir(d, cfg)
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

    tok.write(w)
    for name, arr in tensors:
        w.add_tensor(name, arr)
    return write_gguf_atomically(w, out)


# ----------------------------------------------------------------------------------------------
# Reading back (tests, checks): GGUF -> HF config dict and HF-named state dict


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
    keep = ["token_embd.weight", "output_norm.weight"] + (["output.weight"] if "output.weight" in t else [])
    sd = {names.GLOBAL[k]: t[k] for k in keep}
    for i in range(n_layer):
        for suffix, hf in names.BLOCK[arch].items():
            if suffix not in names.OPTIONAL:
                sd[f"backbone.layers.{i}.{hf}"] = names.to_hf(suffix, t[f"blk.{i}.{suffix}"], arch)
    return sd
