"""The plan: everything the compiler knows about a model between two passes.

A plan starts as the HF model's tensors in fp32 (``plan_from_model``) and ends as exactly what
``docs/packed-format.md`` stores (``passes.pack``: one packed-format-v2 matrix blob per layer). Names follow the file: ``token_embd``, ``blk.i.ssm_in``…
Letters in shape comments: V vocabulary, d d_model, di d_inner, N d_state, R dt_rank, K conv width,
G = ceil(in / 4) groups of a row.

Passes never modify a tensor in place: they build new tensors and share the rest (``Plan.copy``), so
a plan stays valid after the next pass ran (the verifier compares them).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import SparsambaError
from ..model.names import BLOCK, GLOBAL, LINEARS, OPTIONAL, to_gguf


@dataclass(frozen=True)
class Dims:
    vocab_size: int  # V
    d_model: int  # d
    n_layer: int  # L
    d_inner: int  # di
    d_state: int  # N
    dt_rank: int  # R
    d_conv: int  # K
    eps: float  # RMSNorm epsilon
    tied: bool  # the head is token_embd
    use_bias: bool  # ssm_in / ssm_out have biases

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(out, in) of a prunable layer."""
        d, di, N, R = self.d_model, self.d_inner, self.d_state, self.dt_rank
        return {"ssm_in": (2 * di, d), "ssm_x": (R + 2 * N, di), "ssm_dt": (di, R), "ssm_out": (d, di)}[name]


@dataclass
class RowClass:
    """The rows of one layer that share n (weights removed per group of 4)."""

    n: int  # 0..3
    rows: Tensor  # (rows_n,) int32: the output index each row writes, ascending
    keep: Tensor  # (rows_n, 4G) bool: kept positions, exactly 4 - n per group (padding past `in` may be kept)
    weight: Tensor | None = None  # (rows_n, in) fp32, zero where not kept; None once packed (the blob has it)


@dataclass
class LinearPlan:
    """One matrix: dense (``weight``), or in row classes (``classes``); after pack, its matrix blob."""

    out_features: int
    in_features: int
    weight: Tensor | None = None  # (out, in) fp32, dense layers before pack
    classes: list[RowClass] | None = None  # None: dense; rows in no class are removed (n = 4)
    blob: np.ndarray | None = None  # (bytes,) uint8: the packed-format-v2 matrix blob (packed_v2.py), set by pack

    @property
    def dense(self) -> bool:
        return self.classes is None

    @property
    def packed(self) -> bool:
        return self.blob is not None

    @property
    def groups(self) -> int:  # G
        return math.ceil(self.in_features / 4)


@dataclass
class BlockPlan:
    # dense per-block tensors, fp32, by their GGUF suffix: attn_norm.weight (d,) until folded,
    # ssm_conv1d.weight (di, K), ssm_conv1d.bias (di,), ssm_a (di, N), ssm_d (di,), ssm_dt.bias (di,),
    # and with use_bias ssm_in.bias (2·di,), ssm_out.bias (d,)
    tensors: dict[str, Tensor]
    linears: dict[str, LinearPlan]  # ssm_in, ssm_x, ssm_dt, ssm_out
    # π: stored channel c is source channel perm[c]; None = identity or unknown (a plan read from a file)
    perm: Tensor | None = None  # (di,) int64


@dataclass
class Plan:
    dims: Dims
    name: str  # the source model's folder name
    token_embd: LinearPlan  # (V, d), always dense
    output: LinearPlan | None  # (V, d) when the head is not tied
    output_norm: Tensor  # (d,) fp32
    blocks: list[BlockPlan]
    tokenizer: object | None = None  # gguf_io.GGUFTokenizer
    norm_folded: bool = False
    dtype: str | None = None  # set by pack: "f32" | "f16" | "int8"
    passes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # the passes' choices, written as JSON

    def copy(self) -> Plan:
        """A new plan sharing every tensor: containers copied, tensors not (passes never edit them)."""
        memo = {id(t): t for t in _tensors(self)}
        memo[id(self.tokenizer)] = self.tokenizer  # read-only too, and large (one string per token)
        return copy.deepcopy(self, memo)

    def linears(self):
        """(GGUF name, LinearPlan) of every matrix: token_embd, the blocks' layers, output."""
        yield "token_embd", self.token_embd
        for i, b in enumerate(self.blocks):
            for k, lp in b.linears.items():
                yield f"blk.{i}.{k}", lp
        if self.output is not None:
            yield "output", self.output


def _tensors(obj) -> list[Tensor]:
    """Every tensor (and blob) reachable from a plan (for Plan.copy's memo)."""
    if isinstance(obj, Tensor | np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in obj.__dataclass_fields__ for t in _tensors(getattr(obj, f))]
    return []


# ----------------------------------------------------------------------------------------------
# Row classification: which n a row is stored at and which positions it keeps


def classify_rows(W: Tensor) -> tuple[Tensor, Tensor]:
    """W (out, in) dense with exact zeros -> n (out,) int64 and keep (out, 4G) bool.

    n of a row = the fewest zeros in any of its groups of 4, the padding past ``in`` counting as zeros
    (= ``prune.pattern.removed_per_row``): every row follows C_4^n for that n, pattern or not. The kept
    positions of a group are its non-zeros and, when there are fewer than 4 - n, its lowest-index zeros,
    so ``keep`` has exactly 4 - n per group and W is zero off it: the packed row computes exactly W x.
    """
    out, n_in = W.shape
    G = math.ceil(n_in / 4)
    nz = torch.nn.functional.pad(W != 0, (0, 4 * G - n_in)).view(out, G, 4)  # (out, G, 4)
    n = 4 - nz.sum(-1).amax(1)  # (out,)
    # rank the positions of each group: non-zeros first, then zeros, each by index; keep the first 4 - n
    key = (~nz).long() * 4 + torch.arange(4)
    rank = key.argsort(-1).argsort(-1)
    keep = rank < (4 - n).view(out, 1, 1)
    return n, keep.view(out, 4 * G)


def dense_rows(lp: LinearPlan) -> Tensor:
    """The fp32 (out, in) matrix a layer computes, whatever its form (a blob unpacked, int8 dequantised)."""
    if lp.packed:
        from .packed_v2 import dense_of, unpack_matrix

        return torch.from_numpy(dense_of(unpack_matrix(lp.blob)))
    if lp.dense:
        return lp.weight.float()
    W = torch.zeros(lp.out_features, lp.in_features)
    for c in lp.classes:
        W[c.rows.long()] = c.weight
    return W


# ----------------------------------------------------------------------------------------------
# From an HF directory


def load_source(model_dir: str | Path):
    """An HF-format Mamba-1 or Mamba-2 directory -> (its directory, our Mamba1LM / Mamba2LM in eval mode,
    its GGUF tokenizer section or None when it has no tokenizer.json). Refuses a Mamba-2 config the
    engine does not run before reading any weights."""
    from ..gguf_io import GGUFTokenizer
    from ..model.hf import build_model, load_state, read_config, read_weights, resolve

    d = resolve(model_dir)
    cfg = read_config(d)
    if cfg.model_type not in ("mamba", "mamba2"):
        raise SparsambaError(
            f"{d}: a {cfg.model_type} model; the packed engine runs Mamba-1 and Mamba-2 (model_type 'mamba', "
            "'mamba2') only"
        )
    if cfg.model_type == "mamba2":
        from .plan_mamba2 import check_supported

        check_supported(cfg, str(d / "config.json"))
    model = build_model(cfg)
    load_state(model, read_weights(d), d)  # every name and shape checked against config.json
    tok = None
    if (d / "tokenizer.json").is_file():
        tok = GGUFTokenizer.from_model_dir(d, cfg, hf_json=True)
    return d, model.eval(), tok


def plan_from_model(model_dir: str | Path) -> Plan:
    """The plan of an HF-format Mamba-1 / Mamba-2 directory (dense or pruned): fp32 tensors, every layer
    dense."""
    d, model, tok = load_source(model_dir)
    return plan_from_state(model, d.resolve().name, tok)


def plan_from_state(model, name: str, tokenizer=None) -> Plan:
    """The plan of a loaded ``Mamba1LM`` (or ``Mamba2LM``: plan_mamba2.plan_from_mamba2)."""
    cfg = model.config
    if cfg.model_type == "mamba2":
        from .plan_mamba2 import plan_from_mamba2

        return plan_from_mamba2(model, name, tokenizer)
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise SparsambaError(f"{name}: tensor {k} holds inf or NaN; the model cannot be compiled")
    di = cfg.intermediate_size
    dims = Dims(
        vocab_size=cfg.vocab_size,
        d_model=cfg.hidden_size,
        n_layer=cfg.num_hidden_layers,
        d_inner=di,
        d_state=cfg.state_size,
        dt_rank=cfg.time_step_rank,
        d_conv=cfg.conv_kernel,
        eps=float(cfg.layer_norm_epsilon),
        tied=bool(cfg.tie_word_embeddings),
        use_bias=bool(cfg.use_bias),
    )
    blocks = []
    for i in range(dims.n_layer):
        p = f"backbone.layers.{i}."
        t, lin = {}, {}
        for suffix, hf in BLOCK["mamba"].items():
            layer = suffix.removesuffix(".weight")
            if layer in LINEARS["mamba"]:
                lin[layer] = LinearPlan(*sd[p + hf].shape, weight=sd[p + hf])
            elif suffix == "ssm_conv1d.bias":
                t[suffix] = sd.get(p + hf, torch.zeros(di))  # none = zeros, as the file says
            elif suffix not in OPTIONAL or dims.use_bias:
                t[suffix] = to_gguf(suffix, sd[p + hf], "mamba")  # the engine needs A itself, conv as (di, K)
        blocks.append(BlockPlan(t, lin))
    embd, head = sd[GLOBAL["token_embd.weight"]], sd.get(GLOBAL["output.weight"])
    out = None if dims.tied else LinearPlan(*head.shape, weight=head)
    return Plan(
        dims=dims,
        name=name,
        token_embd=LinearPlan(*embd.shape, weight=embd),
        output=out,
        output_norm=sd[GLOBAL["output_norm.weight"]],
        blocks=blocks,
        tokenizer=tokenizer,
    )


def with_pass(plan: Plan, name: str, **options) -> Plan:
    """``plan`` with pass ``name`` appended to its history and its choices recorded."""
    return replace(plan, passes=[*plan.passes, name], options={**plan.options, name: options})
