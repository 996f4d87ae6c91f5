"""Mamba-1 in plain PyTorch: the spec of the model that everything else in sparsamba is checked against.

Glossary (paper symbol -> name here), shapes in comments use these letters:
    b        batch size
    l        sequence length
    d        d_model, the residual width (HF: hidden_size)
    di       d_inner = expand * d_model (HF: intermediate_size)
    N        d_state, the SSM state size per channel (HF: state_size)
    R        dt_rank, the rank of the Δ projection (HF: time_step_rank)
    K        d_conv, the causal depthwise conv width (HF: conv_kernel)
    A        -exp(A_log), (di, N): continuous-time state matrix (diagonal per channel)
    Δ        delta = softplus(dt_proj(x_proj(u)[:R])), (b, l, di): the input-dependent step size
    B, C     x_proj(u)[R:R+N], x_proj(u)[R+N:], (b, l, N): input-dependent in/out state maps
    D        (di,): the skip connection around the SSM
    h        SSM state, (b, di, N):  h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t,   y_t = h_t C_t + D u_t

Parameter names are transformers' ``MambaForCausalLM`` names, so a state dict moves between the
two (and into the HF-format files sparsamba writes) without renaming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm


@dataclass
class Mamba1Config:
    vocab_size: int = 50280
    hidden_size: int = 768  # d
    state_size: int = 16  # N
    num_hidden_layers: int = 24
    expand: int = 2
    conv_kernel: int = 4  # K
    time_step_rank: int = 0  # R; 0 means ceil(d / 16), as transformers' "auto"
    use_bias: bool = False  # bias of in_proj / out_proj
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, kept on save

    model_type = "mamba"

    def __post_init__(self) -> None:
        if not self.time_step_rank:
            self.time_step_rank = math.ceil(self.hidden_size / 16)

    @property
    def intermediate_size(self) -> int:  # di
        return self.expand * self.hidden_size

    @classmethod
    def from_hf(cls, d: dict) -> Mamba1Config:
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("time_step_rank") == "auto":
            kw["time_step_rank"] = 0
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(kw.get(k), list):  # transformers allows a list of eos ids; we keep the first
                kw[k] = kw[k][0] if kw[k] else None
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**kw, extra=extra)

    def to_hf(self) -> dict:
        d = {**self.extra, **{k: v for k, v in asdict(self).items() if k != "extra"}}
        d.update(
            model_type=self.model_type,
            architectures=["MambaForCausalLM"],
            intermediate_size=self.intermediate_size,
        )
        return d


# ----------------------------------------------------------------------------------------------
# The selective scan: the recurrence as written, and the same made fast


def selective_scan_ref(
    u: torch.Tensor,  # (b, l, di)
    delta: torch.Tensor,  # (b, l, di), already softplus'ed
    A: torch.Tensor,  # (di, N)
    B: torch.Tensor,  # (b, l, N)
    C: torch.Tensor,  # (b, l, N)
    D: torch.Tensor,  # (di,)
    h0: torch.Tensor | None = None,  # (b, di, N)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence exactly as written in the glossary, one step at a time. Returns y (b, l, di), h_l."""
    b, l, di = u.shape
    h = u.new_zeros(b, di, A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, t, :, None] * A)  # (b, di, N)
        dBu = delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]  # (b, di, N)
        h = dA * h + dBu
        ys.append((h * C[:, t, None, :]).sum(-1))  # (b, di)
    return torch.stack(ys, 1) + u * D, h


def selective_scan(
    u: torch.Tensor,  # (b, l, di)
    delta: torch.Tensor,  # (b, l, di)
    A: torch.Tensor,  # (di, N)
    B: torch.Tensor,  # (b, l, N)
    C: torch.Tensor,  # (b, l, N)
    D: torch.Tensor,  # (di,)
    h0: torch.Tensor | None = None,  # (b, di, N)
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as ``selective_scan_ref``, fast on a CPU and under autograd.

    exp(ΔA) and ΔBu are computed for ``chunk`` steps at once (bounding memory to O(b·chunk·di·N)
    whatever l is); the recurrence itself runs on slices taken with ``unbind``, which keeps the
    backward pass from allocating a whole-tensor gradient per step (see the CPU notes). On 2 CPU
    cores this beat a log-depth parallel scan by ~3x, forward + backward.
    """
    b, l, di = u.shape
    h = u.new_zeros(b, di, A.shape[1]) if h0 is None else h0
    ys = []
    for s in range(0, l, chunk):
        dt = delta[:, s : s + chunk]  # (b, c, di)
        dA = torch.exp(dt[..., None] * A)  # (b, c, di, N)
        dBu = (dt * u[:, s : s + chunk])[..., None] * B[:, s : s + chunk, None, :]  # (b, c, di, N)
        for a_t, x_t, c_t in zip(dA.unbind(1), dBu.unbind(1), C[:, s : s + chunk].unbind(1)):
            h = torch.addcmul(x_t, a_t, h)  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
            ys.append(torch.bmm(h, c_t[:, :, None]))  # y_t = h_t C_t, (b, di, 1)
    y = torch.cat(ys, 2).transpose(1, 2) if ys else u.new_zeros(b, 0, di)
    return y + u * D, h


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class Mamba1LayerState:
    conv: torch.Tensor  # (b, di, K-1): the last K-1 inputs of conv1d
    ssm: torch.Tensor  # (b, di, N)


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg: Mamba1Config):
        super().__init__()
        d, di, N, R, K = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.state_size,
            cfg.time_step_rank,
            cfg.conv_kernel,
        )
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = di, N, R, K
        self.in_proj = nn.Linear(d, 2 * di, bias=cfg.use_bias)  # -> x, z
        self.conv1d = nn.Conv1d(di, di, K, groups=di, padding=K - 1, bias=cfg.use_conv_bias)
        self.x_proj = nn.Linear(di, R + 2 * N, bias=False)  # -> Δ (low rank), B, C
        self.dt_proj = nn.Linear(R, di, bias=True)
        # Mamba's Δ init: softplus(bias) log-uniform in [1e-3, 0.1], small random weights
        with torch.no_grad():
            self.dt_proj.weight.uniform_(-(R**-0.5), R**-0.5)
            dt = torch.exp(torch.rand(di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=cfg.use_bias)

    def _ssm_inputs(self, x: torch.Tensor):
        """x: (b, l, di) after conv + SiLU -> Δ (b, l, di), B, C (b, l, N)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        return delta, B, C

    def forward(
        self, hidden: torch.Tensor, state: Mamba1LayerState | None = None
    ) -> tuple[torch.Tensor, Mamba1LayerState]:
        """hidden: (b, l, d) -> (b, l, d), and the state after the last position."""
        b, l, _ = hidden.shape
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, di) each
        xt = x.transpose(1, 2)  # (b, di, l)
        K = self.d_conv
        if state is not None:
            xt = torch.cat([state.conv, xt], 2)  # prepend the carried inputs
            conv = F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)  # (b, di, l)
        else:
            conv = self.conv1d(xt)[..., :l]
            xt = F.pad(xt, (K - 1, 0))
        new_conv = xt[..., xt.shape[2] - (K - 1) :]
        x = F.silu(conv).transpose(1, 2)  # (b, l, di)
        delta, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())  # keep A in fp32 whatever the weights are
        y, h = selective_scan(x, delta, A, B, C, self.D, None if state is None else state.ssm)
        y = y * F.silu(z)
        return self.out_proj(y), Mamba1LayerState(new_conv, h)

    def step(self, hidden: torch.Tensor, state: Mamba1LayerState) -> tuple[torch.Tensor, Mamba1LayerState]:
        """One token: hidden (b, d) -> (b, d); the recurrent form used for decode."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, di)
        window = torch.cat([state.conv, x[..., None]], 2)  # (b, di, K)
        conv = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        x = F.silu(conv)
        delta, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        h = torch.exp(delta[..., None] * A) * state.ssm + (delta * x)[..., None] * B[:, None, :]
        y = (h * C[:, None, :]).sum(-1) + x * self.D
        y = y * F.silu(z)
        return self.out_proj(y), Mamba1LayerState(window[..., 1:], h)


class Mamba1Block(nn.Module):
    def __init__(self, cfg: Mamba1Config):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = Mamba1Mixer(cfg)


class Mamba1Backbone(nn.Module):
    def __init__(self, cfg: Mamba1Config):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Mamba1Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class Mamba1LM(nn.Module):
    """Mamba-1 language model: ``forward`` for whole sequences, ``step`` for one token at a time."""

    def __init__(self, cfg: Mamba1Config):
        super().__init__()
        self.config = cfg
        self.backbone = Mamba1Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)  # small: the head may be tied to it

    def init_state(self, batch: int) -> list[Mamba1LayerState]:
        p = self.backbone.embeddings.weight
        cfg = self.config
        di, N, K = cfg.intermediate_size, cfg.state_size, cfg.conv_kernel
        return [
            Mamba1LayerState(p.new_zeros(batch, di, K - 1), p.new_zeros(batch, di, N, dtype=torch.float32))
            for _ in range(cfg.num_hidden_layers)
        ]

    def forward(
        self,
        input_ids: torch.Tensor,  # (b, l)
        state: list[Mamba1LayerState] | None = None,
        return_state: bool = False,
    ):
        """Logits (b, l, V); with ``return_state`` also the per-layer states after the last token,
        from which ``step`` continues. Residuals are kept in fp32, as transformers does."""
        h = self.backbone.embeddings(input_ids).float()
        new_state = []
        for i, layer in enumerate(self.backbone.layers):
            out, s = layer.mixer(
                layer.norm(h).to(layer.mixer.in_proj.weight.dtype), None if state is None else state[i]
            )
            h = h + out.float()
            new_state.append(s)
        logits = self.lm_head(self.backbone.norm_f(h).to(self.lm_head.weight.dtype))
        return (logits, new_state) if return_state else logits

    def step(self, token: torch.Tensor, state: list[Mamba1LayerState]):
        """token: (b,) -> logits (b, V) and the new state."""
        h = self.backbone.embeddings(token).float()
        new_state = []
        for layer, s in zip(self.backbone.layers, state):
            out, s = layer.mixer.step(layer.norm(h).to(layer.mixer.in_proj.weight.dtype), s)
            h = h + out.float()
            new_state.append(s)
        return self.lm_head(self.backbone.norm_f(h).to(self.lm_head.weight.dtype)), new_state
