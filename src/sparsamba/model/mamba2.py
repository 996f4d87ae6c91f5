"""Mamba-2 in plain PyTorch: the spec of the model that everything else in sparsamba is checked against.

Glossary (paper symbol -> name here), shapes in comments use these letters:
    b        batch size
    l        sequence length
    d        d_model, the residual width (HF: hidden_size)
    di       d_inner = expand * d_model = h * p (HF: intermediate_size)
    h        number of SSM heads (HF: num_heads)
    p        head dimension, channels per head (HF: head_dim)
    g        number of B/C groups (HF: n_groups); heads [i*h/g, (i+1)*h/g) share group i's B and C
    r        heads per group, h / g
    N        d_state, the SSM state size (HF: state_size)
    K        d_conv, the causal depthwise conv width (HF: conv_kernel)
    Q        chunk length of the chunked scan (HF: chunk_size)
    A        -exp(A_log), (h,): one scalar decay rate per head (Mamba-1 had a (di, N) matrix)
    Δ        dt = clamp(softplus(dt_raw + dt_bias), *time_step_limit), (b, l, h): one step size per head
    B, C     (b, l, g, N): input-dependent in/out state maps, one per group
    D        (h,): the skip connection around the SSM, one per head
    S        SSM state, (b, h, p, N), per head:
                 S_t = exp(Δ_t A) S_{t-1} + Δ_t x_t ⊗ B_t,   y_t = S_t C_t + D x_t   (x_t: (p,))
    z        the gate, (b, l, di): out = out_proj(RMSNorm_g(y ⊙ silu(z))), the norm taken per group

One layer: in_proj(u) -> [z (di) | xBC (di + 2gN) | dt_raw (h)]; xBC goes through the causal depthwise
conv1d and SiLU *together* (so B and C are convolved too, unlike Mamba-1) and is then split into
x (di), B (gN), C (gN).

Parameter names are transformers' ``Mamba2ForCausalLM`` names, so a state dict moves between the
two (and into the HF-format files sparsamba writes) without renaming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparsambaError
from .norm import RMSNorm


@dataclass
class Mamba2Config:
    vocab_size: int = 32768
    hidden_size: int = 4096  # d
    state_size: int = 128  # N
    num_hidden_layers: int = 64
    expand: int = 2
    conv_kernel: int = 4  # K
    n_groups: int = 8  # g
    head_dim: int = 64  # p
    num_heads: int = 128  # h; h * p must equal expand * d
    chunk_size: int = 256  # Q; changes rounding only, never the result
    use_bias: bool = False  # bias of in_proj / out_proj
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5  # both the block RMSNorms and the gated norm
    rms_norm: bool = True  # gated RMSNorm before out_proj; False: y * silu(z) (mamba_ssm rmsnorm=False)
    residual_in_fp32: bool = True
    hidden_act: str = "silu"  # only silu is supported
    time_step_limit: tuple[float, float] = (0.0, float("inf"))  # Δ is clamped into this range
    time_step_min: float = 0.001  # these three only shape the initial dt_bias
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, kept on save

    model_type = "mamba2"

    def __post_init__(self) -> None:
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        self.validate()

    def validate(self) -> None:
        """Raise ``SparsambaError`` for configurations transformers rejects or that have no model."""
        pre = "Mamba-2 config: "
        sizes = "vocab_size hidden_size state_size expand conv_kernel n_groups head_dim num_heads chunk_size"
        for k in sizes.split():
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise SparsambaError(f"{pre}{k} must be a positive integer, got {getattr(self, k)!r}")
        if self.num_heads * self.head_dim != self.intermediate_size:
            raise SparsambaError(
                f"{pre}num_heads * head_dim ({self.num_heads} * {self.head_dim} = "
                f"{self.num_heads * self.head_dim}) must equal expand * hidden_size ({self.expand} * "
                f"{self.hidden_size} = {self.intermediate_size}); fix num_heads or head_dim in config.json"
            )
        if self.num_heads % self.n_groups:
            raise SparsambaError(
                f"{pre}num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups}): "
                "each group of B/C is shared by the same number of heads"
            )
        if len(self.time_step_limit) != 2 or not 0 <= self.time_step_limit[0] <= self.time_step_limit[1]:
            raise SparsambaError(
                f"{pre}time_step_limit must be [lo, hi] with 0 <= lo <= hi, got {list(self.time_step_limit)}"
            )
        if self.hidden_act != "silu":
            raise SparsambaError(f"{pre}hidden_act {self.hidden_act!r} is not supported, only 'silu'")

    @property
    def intermediate_size(self) -> int:  # di
        return self.expand * self.hidden_size

    @property
    def conv_dim(self) -> int:  # channels through conv1d: x, B, C
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @classmethod
    def from_hf(cls, d: dict) -> Mamba2Config:
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(kw.get(k), list):  # transformers allows a list of eos ids; we keep the first
                kw[k] = kw[k][0] if kw[k] else None
        if d.get("norm_before_gate"):  # old mamba_ssm-style key; transformers silently ignores it
            raise SparsambaError(
                "Mamba-2 config: norm_before_gate=true is not supported (transformers ignores it and "
                "gates before the norm, which would silently compute a different model)"
            )
        derived = ("intermediate_size", "model_type", "architectures")  # checked or fixed; to_hf writes them
        extra = {k: v for k, v in d.items() if k not in known and k not in derived}
        cfg = cls(**kw, extra=extra)
        if "intermediate_size" in d and d["intermediate_size"] != cfg.intermediate_size:
            raise SparsambaError(
                f"Mamba-2 config: intermediate_size ({d['intermediate_size']}) must equal expand * hidden_size "
                f"({cfg.expand} * {cfg.hidden_size} = {cfg.intermediate_size})"
            )
        return cfg

    def to_hf(self) -> dict:
        d = {**self.extra, **{k: v for k, v in asdict(self).items() if k != "extra"}}
        d.update(
            model_type=self.model_type,
            architectures=["Mamba2ForCausalLM"],
            intermediate_size=self.intermediate_size,
            time_step_limit=list(self.time_step_limit),
        )
        return d


# ----------------------------------------------------------------------------------------------
# The SSD scan: a sequential reference and the chunked form used everywhere else.
# Both take x (b, l, h, p), Δ (b, l, h) (already softplus'ed and clamped), A (h,), B, C (b, l, g, N),
# D (h,) and an optional initial state S0 (b, h, p, N); both return y (b, l, h, p) and S_l.


def ssd_step(
    x: torch.Tensor,  # (b, h, p)
    dt: torch.Tensor,  # (b, h)
    A: torch.Tensor,  # (h,)
    B: torch.Tensor,  # (b, g, N)
    C: torch.Tensor,  # (b, g, N)
    D: torch.Tensor,  # (h,)
    S: torch.Tensor,  # (b, h, p, N)
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence in the glossary. Returns y (b, h, p) and the new state."""
    r = x.shape[1] // B.shape[1]
    B = B.repeat_interleave(r, dim=1)  # (b, h, N): head i reads group i // r
    C = C.repeat_interleave(r, dim=1)
    S = torch.exp(dt * A)[..., None, None] * S + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = (S * C[:, :, None, :]).sum(-1) + x * D[:, None]
    return y, S


def ssd_scan_ref(
    x: torch.Tensor,  # (b, l, h, p)
    dt: torch.Tensor,  # (b, l, h)
    A: torch.Tensor,  # (h,)
    B: torch.Tensor,  # (b, l, g, N)
    C: torch.Tensor,  # (b, l, g, N)
    D: torch.Tensor,  # (h,)
    S0: torch.Tensor | None = None,  # (b, h, p, N)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence exactly as written in the glossary, one step at a time. Returns y, S_l."""
    b, l, h, p = x.shape
    S = x.new_zeros(b, h, p, B.shape[-1]) if S0 is None else S0
    ys = []
    for t in range(l):
        y, S = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, S)
        ys.append(y)
    y = torch.stack(ys, 1) if ys else x.new_zeros(b, 0, h, p)
    return y, S


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a: (..., q) log decays -> (..., q, q) with [t, s] = a[s+1] + ... + a[t] for s <= t, -inf above.

    exp() of it is the decay from step s to step t. Summing a masked copy of ``a`` (rather than
    subtracting two long cumulative sums) keeps each entry exact to a few ulps of its own size, and
    every entry is <= 0, so exp() never sees a positive number.
    """
    q = a.shape[-1]
    ones = torch.ones(q, q, dtype=torch.bool, device=a.device)
    terms = a[..., :, None].expand(*a.shape, q)  # [k, s] = a[k]
    terms = terms.masked_fill(~ones.tril(-1), 0)  # keep k > s
    return terms.cumsum(-2).masked_fill(~ones.tril(), -math.inf)  # [t, s] = sum_{s < k <= t} a[k]


def ssd_scan(
    x: torch.Tensor,  # (b, l, h, p)
    dt: torch.Tensor,  # (b, l, h)
    A: torch.Tensor,  # (h,)
    B: torch.Tensor,  # (b, l, g, N)
    C: torch.Tensor,  # (b, l, g, N)
    D: torch.Tensor,  # (h,)
    S0: torch.Tensor | None = None,  # (b, h, p, N)
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as ``ssd_scan_ref``, in chunks of ``chunk`` steps (the SSD "block decomposition").

    Inside a chunk the output is a masked attention-like product, y_t = sum_{s<=t} (C_t·B_s)
    exp(a_{s+1} + ... + a_t) Δ_s x_s with a = Δ A, plus the state carried in from the previous chunk,
    decayed to step t and read out by C_t. The state is then advanced to the chunk's end and carried
    on. Memory is O(b·h·Q² + b·Q·h·p) per chunk whatever l is; the last chunk may be shorter.
    """
    b, l, h, p = x.shape
    g, N = B.shape[2], B.shape[3]
    r = h // g
    S = x.new_zeros(b, h, p, N) if S0 is None else S0
    ys = []
    for s in range(0, l, chunk):
        xc, Bc, Cc = x[:, s : s + chunk], B[:, s : s + chunk], C[:, s : s + chunk]
        dtc = dt[:, s : s + chunk]  # (b, q, h)
        q = xc.shape[1]
        a = (dtc * A).transpose(1, 2)  # (b, h, q): log decay of each step, <= 0
        decay = torch.exp(_segsum(a)).view(b, g, r, q, q)  # [t, s]: decay from s to t, 0 for s > t
        a_in = torch.exp(a.cumsum(-1)).view(b, g, r, q)  # decay from the chunk start to t, inclusive
        a_out = decay[..., -1, :]  # (b, g, r, q): decay from s to the chunk's last step
        xdt = (xc * dtc[..., None]).view(b, q, g, r, p)  # Δ_s x_s
        Sg = S.reshape(b, g, r, p, N)

        CB = torch.einsum("btgn,bsgn->bgts", Cc, Bc)  # (b, g, q, q), shared by the r heads of a group
        y_diag = torch.einsum("bgts,bgrts,bsgrp->btgrp", CB, decay, xdt)  # within the chunk
        y_off = torch.einsum("btgn,bgrpn,bgrt->btgrp", Cc, Sg, a_in)  # from the carried state
        ys.append((y_diag + y_off).reshape(b, q, h, p))

        S_new = torch.einsum("bgrs,bsgn,bsgrp->bgrpn", a_out, Bc, xdt)  # the chunk's own inputs
        S = (a_in[..., -1, None, None] * Sg + S_new).reshape(b, h, p, N)
    y = torch.cat(ys, 1) if ys else x.new_zeros(b, 0, h, p)
    return y + x * D[:, None], S


# ----------------------------------------------------------------------------------------------
# The model


class RMSNormGated(nn.Module):
    """y = w ⊙ n_g(x ⊙ silu(z)), n_g = RMS-normalization over each of g equal channel groups
    (the di / g channels of the heads that share one B/C group), in fp32, as transformers'
    ``MambaRMSNormGated`` (gate before norm, i.e. mamba_ssm's norm_before_gate=False)."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(gate.float())
        xg = x.unflatten(-1, (-1, self.group_size))  # (..., g, di/g)
        x = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * x.to(dtype)


@dataclass
class Mamba2LayerState:
    conv: torch.Tensor  # (b, conv_dim, K-1): the last K-1 inputs of conv1d (x, B, C channels)
    ssm: torch.Tensor  # (b, h, p, N), fp32


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        d, di, N, K = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.conv_kernel
        h, g = cfg.num_heads, cfg.n_groups
        self.d_inner, self.d_state, self.d_conv, self.n_heads, self.head_dim = di, N, K, h, cfg.head_dim
        self.n_groups, self.conv_dim, self.chunk = g, cfg.conv_dim, cfg.chunk_size
        self.dt_limit = cfg.time_step_limit
        self.in_proj = nn.Linear(d, di + self.conv_dim + h, bias=cfg.use_bias)  # -> z, xBC, Δ
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, K, groups=self.conv_dim, padding=K - 1, bias=cfg.use_conv_bias
        )
        # Δ = softplus(dt_raw + dt_bias); initialised so that Δ starts log-uniform in [dt_min, dt_max]
        dt = torch.exp(
            torch.rand(h) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
            + math.log(cfg.time_step_min)
        ).clamp(min=cfg.time_step_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = RMSNormGated(di, di // g, cfg.layer_norm_epsilon) if cfg.rms_norm else None
        self.out_proj = nn.Linear(di, d, bias=cfg.use_bias)

    def _ssm_inputs(self, xBC: torch.Tensor, dt: torch.Tensor):
        """xBC (..., conv_dim) after conv + SiLU, dt (..., h) raw -> x (..., h, p), Δ (..., h),
        B, C (..., g, N), all fp32."""
        di, gN = self.d_inner, self.n_groups * self.d_state
        x, B, C = xBC.float().split([di, gN, gN], dim=-1)
        delta = F.softplus(dt.float() + self.dt_bias.float())  # transformers does this in the weights' dtype
        if self.dt_limit != (0.0, math.inf):
            # in both forward and step; transformers' single-token decode path skips this clamp
            delta = delta.clamp(*self.dt_limit)
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        B = B.unflatten(-1, (self.n_groups, self.d_state))
        C = C.unflatten(-1, (self.n_groups, self.d_state))
        return x, delta, B, C

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y (..., di) fp32, z (..., di) -> (..., d): gate, (group-)normalize, project."""
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z.float())
        return self.out_proj(y.to(dtype))

    def forward(
        self, hidden: torch.Tensor, state: Mamba2LayerState | None = None
    ) -> tuple[torch.Tensor, Mamba2LayerState]:
        """hidden: (b, l, d) -> (b, l, d), and the state after the last position."""
        b, l, _ = hidden.shape
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xt = xBC.transpose(1, 2)  # (b, conv_dim, l)
        K = self.d_conv
        if state is not None:
            xt = torch.cat([state.conv, xt], 2)  # prepend the carried inputs
            conv = F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)  # (b, cd, l)
        else:
            conv = self.conv1d(xt)[..., :l]
            xt = F.pad(xt, (K - 1, 0))
        new_conv = xt[..., xt.shape[2] - (K - 1) :]
        x, delta, B, C = self._ssm_inputs(F.silu(conv).transpose(1, 2), dt)  # (b, l, h, p), (b, l, h), ...
        A = -torch.exp(self.A_log.float())  # (h,), fp32 whatever the weights are
        S0 = None if state is None else state.ssm
        y, S = ssd_scan(x, delta, A, B, C, self.D.float(), S0, chunk=self.chunk)  # (b, l, h, p)
        return self._output(y.reshape(b, l, self.d_inner), z, hidden.dtype), Mamba2LayerState(new_conv, S)

    def step(self, hidden: torch.Tensor, state: Mamba2LayerState) -> tuple[torch.Tensor, Mamba2LayerState]:
        """One token: hidden (b, d) -> (b, d); the recurrent form used for decode."""
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        window = torch.cat([state.conv, xBC[..., None]], 2)  # (b, conv_dim, K)
        conv = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        x, delta, B, C = self._ssm_inputs(F.silu(conv), dt)  # (b, h, p), (b, h), (b, g, N) x2
        A = -torch.exp(self.A_log.float())
        y, S = ssd_step(x, delta, A, B, C, self.D.float(), state.ssm)  # (b, h, p)
        out = self._output(y.flatten(1), z, hidden.dtype)
        return out, Mamba2LayerState(window[..., 1:], S)


class Mamba2Block(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(cfg)


class Mamba2Backbone(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class Mamba2LM(nn.Module):
    """Mamba-2 language model: ``forward`` for whole sequences, ``step`` for one token at a time."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.config = cfg
        self.backbone = Mamba2Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def init_state(self, batch: int) -> list[Mamba2LayerState]:
        p = self.backbone.embeddings.weight
        cfg = self.config
        h, hp, N, K = cfg.num_heads, cfg.head_dim, cfg.state_size, cfg.conv_kernel
        return [
            Mamba2LayerState(
                p.new_zeros(batch, cfg.conv_dim, K - 1), p.new_zeros(batch, h, hp, N, dtype=torch.float32)
            )
            for _ in range(cfg.num_hidden_layers)
        ]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.backbone.embeddings(ids)
        return h.float() if self.config.residual_in_fp32 else h

    @staticmethod
    def _mixer_input(layer: Mamba2Block, h: torch.Tensor) -> torch.Tensor:
        """As transformers: the block norm sees the residual cast to its weights' dtype."""
        return layer.norm(h.to(layer.norm.weight.dtype)).to(layer.mixer.in_proj.weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # (b, l)
        state: list[Mamba2LayerState] | None = None,
        return_state: bool = False,
    ):
        """Logits (b, l, V); with ``return_state`` also the per-layer states after the last token,
        from which ``step`` (or another ``forward``) continues. Residuals are kept in fp32 when
        ``residual_in_fp32``, as transformers does."""
        h = self._embed(input_ids)  # (b, l, d)
        new_state = []
        for i, layer in enumerate(self.backbone.layers):
            out, s = layer.mixer(self._mixer_input(layer, h), None if state is None else state[i])
            h = h + out.to(h.dtype)
            new_state.append(s)
        logits = self.lm_head(self.backbone.norm_f(h).to(self.lm_head.weight.dtype))
        return (logits, new_state) if return_state else logits

    def step(self, token: torch.Tensor, state: list[Mamba2LayerState]):
        """token: (b,) -> logits (b, V) and the new state."""
        h = self._embed(token)  # (b, d)
        new_state = []
        for layer, s in zip(self.backbone.layers, state):
            out, s = layer.mixer.step(self._mixer_input(layer, h), s)
            h = h + out.to(h.dtype)
            new_state.append(s)
        return self.lm_head(self.backbone.norm_f(h).to(self.lm_head.weight.dtype)), new_state
