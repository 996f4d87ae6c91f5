"""Reading and writing HF-format model directories: ``config.json`` + ``model.safetensors`` (or
sharded safetensors, or a ``pytorch_model.bin`` read with ``weights_only=True``) + ``tokenizer.json``.

Both transformers' names (``backbone.layers.0.mixer.in_proj.weight``) and the original
``state-spaces/mamba-*`` names (``backbone.layers.0.mixer...`` with ``backbone.embedding`` and a
``config.json`` holding ``d_model`` / ``n_layer``) are accepted. A hub id is downloaded with
``huggingface_hub`` when a network exists.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import SparsambaError
from ..outputs import write_dir_atomically
from .mamba1 import Mamba1Config, Mamba1LM
from .mamba2 import Mamba2Config, Mamba2LM

ARCHS = {"mamba": (Mamba1Config, Mamba1LM), "mamba2": (Mamba2Config, Mamba2LM)}
MambaConfig = Mamba1Config | Mamba2Config
MambaLM = Mamba1LM | Mamba2LM


def _ssm_cfg_layer(d: dict) -> str | None:
    ssm = d.get("ssm_cfg") or {}
    return ssm.get("layer")


def _from_state_spaces(d: dict) -> dict:
    """Map an original ``state-spaces/mamba-*`` config (d_model, n_layer, ssm_cfg, ...) to HF keys."""
    ssm = d.get("ssm_cfg") or {}
    vocab = d["vocab_size"]
    mult = d.get("pad_vocab_size_multiple", 8)
    vocab = math.ceil(vocab / mult) * mult  # the original code pads the vocabulary like this
    hf = {
        "vocab_size": vocab,
        "hidden_size": d["d_model"],
        "num_hidden_layers": d["n_layer"],
        "tie_word_embeddings": d.get("tie_embeddings", True),
        "layer_norm_epsilon": d.get("norm_epsilon", 1e-5),
        "residual_in_fp32": d.get("residual_in_fp32", True),
    }
    if ssm.get("layer") == "Mamba2":
        hf.update(
            model_type="mamba2",
            state_size=ssm.get("d_state", 128),
            conv_kernel=ssm.get("d_conv", 4),
            expand=ssm.get("expand", 2),
            head_dim=ssm.get("headdim", 64),
            n_groups=ssm.get("ngroups", 1),
            chunk_size=ssm.get("chunk_size", 256),
            use_bias=ssm.get("bias", False),
            use_conv_bias=ssm.get("conv_bias", True),
            rms_norm=ssm.get("rmsnorm", True),
        )
        hf["num_heads"] = hf["expand"] * hf["hidden_size"] // hf["head_dim"]
    else:
        hf.update(
            model_type="mamba",
            state_size=ssm.get("d_state", 16),
            conv_kernel=ssm.get("d_conv", 4),
            expand=ssm.get("expand", 2),
            time_step_rank=ssm.get("dt_rank", "auto"),
            use_bias=ssm.get("bias", False),
            use_conv_bias=ssm.get("conv_bias", True),
        )
    return hf


def _rename_state_spaces(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        k = k.replace("backbone.embedding.", "backbone.embeddings.")
        out[k] = v
    return out


def _special_floats(obj: dict):
    # transformers >= 5 writes inf / nan in config.json as {"__float__": "Infinity"}
    if obj.keys() == {"__float__"}:
        return float(obj["__float__"])
    return obj


def read_config(model_dir: Path) -> MambaConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise SparsambaError(
            f"{model_dir}: no config.json; give an HF-format model directory (config.json + model.safetensors)"
        )
    try:
        d = json.loads(path.read_text(), object_hook=_special_floats)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsambaError(f"{path}: not valid JSON ({e}); repair or replace the file") from None
    if not isinstance(d, dict):
        raise SparsambaError(f"{path}: expected a JSON object")
    if "model_type" not in d and "d_model" in d:
        d = _from_state_spaces(d)
    mt = d.get("model_type")
    if mt == "falcon_mamba":
        raise SparsambaError(
            f"{path}: model_type 'falcon_mamba' is not supported yet (it adds B/C/Δ RMS norms); use a mamba or mamba2 model"
        )
    if mt not in ARCHS:
        raise SparsambaError(
            f"{path}: unknown model_type {mt!r}; sparsamba reads 'mamba' (MambaForCausalLM) and 'mamba2' (Mamba2ForCausalLM)"
        )
    # the sizes that define the model must be stated: a default (transformers' hidden_size 768)
    # would build a different model than the weights, or fail far from the cause
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise SparsambaError(f"{path}: {', '.join(missing)} missing; config.json must state the model's sizes")
    _check_fields(d, path)
    cfg_cls = ARCHS[mt][0]
    try:
        cfg = cfg_cls.from_hf(d)
    except (TypeError, ValueError) as e:
        raise SparsambaError(f"{path}: a field has the wrong type or value ({e})") from None
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "state_size"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or v <= 0:
            raise SparsambaError(f"{path}: {key} must be a positive integer, got {v!r}")
    return cfg


REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers")
# fields read as sizes (positive integers) and as positive finite floats, wherever they appear
_SIZE_KEYS = (
    "vocab_size hidden_size state_size num_hidden_layers expand conv_kernel n_groups head_dim num_heads "
    "chunk_size intermediate_size"
).split()
_POSITIVE_FLOAT_KEYS = ("layer_norm_epsilon",)


def _check_fields(d: dict, path: Path) -> None:
    """One line naming the field for a value that is no size: "banana", -2, 2e6 as a float, true."""
    for k in _SIZE_KEYS:
        if k in d and (isinstance(d[k], bool) or not isinstance(d[k], int) or d[k] < 1):
            raise SparsambaError(f"{path}: {k} must be a positive integer, got {d[k]!r}")
    rank = d.get("time_step_rank")
    if rank is not None and rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise SparsambaError(f"{path}: time_step_rank must be a positive integer or \"auto\", got {rank!r}")
    for k in _POSITIVE_FLOAT_KEYS:
        v = d.get(k)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
        ):
            raise SparsambaError(f"{path}: {k} must be a positive finite number, got {v!r}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SparsambaError(
            f"{path}: cannot read safetensors ({e}); the file is truncated or corrupt, download or write it again"
        ) from None


def _shards(model_dir: Path, index: Path) -> list[Path]:
    """The shard files an index names, each confined to the model directory: a name such as
    ``../../x.safetensors`` or ``/etc/passwd`` is refused, never opened."""
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SparsambaError(f"{index}: not a valid safetensors index ({e})") from None
    root = model_dir.resolve()
    out = []
    for name in names:
        p = (model_dir / str(name)).resolve()
        if not isinstance(name, str) or not name.endswith(".safetensors") or p.parent != root:
            raise SparsambaError(
                f"{index}: shard {name!r} is not a .safetensors file inside {model_dir}; refusing to open it"
            )
        if not p.is_file():
            raise SparsambaError(f"{model_dir / name}: shard named in {index.name} is missing")
        out.append(p)
    return out


def _safetensors_files(model_dir: Path) -> list[Path] | None:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    return _shards(model_dir, index) if index.is_file() else None


def weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of the stored tensors, read from the safetensors headers alone (no data);
    None for a ``pytorch_model.bin``, whose shapes need the whole file."""
    from safetensors import SafetensorError, safe_open

    files = _safetensors_files(model_dir)
    if files is None:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise SparsambaError(
                f"{f}: cannot read safetensors ({e}); the file is truncated or corrupt, download or write it again"
            ) from None
    return shapes


def check_config_fits_weights(cfg: MambaConfig, model_dir: Path) -> None:
    """Compare the sizes config.json states with the stored tensors' headers *before* anything is
    allocated: a config claiming hidden_size 2e6 or 1e9 layers fails here in milliseconds instead of
    building a model until memory runs out."""
    shapes = weight_shapes(model_dir)
    if shapes is None:
        return  # pytorch_model.bin: load_state checks every name and shape after loading
    shapes = _rename_state_spaces(shapes)
    where = model_dir / "config.json"
    emb = shapes.get("backbone.embeddings.weight")
    if emb is not None and tuple(emb) != (cfg.vocab_size, cfg.hidden_size):
        raise SparsambaError(
            f"{where}: vocab_size x hidden_size = {cfg.vocab_size} x {cfg.hidden_size}, but the stored "
            f"embedding is {emb[0]} x {emb[1]}; the weights and config.json disagree"
        )
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("backbone.layers.") and k.split(".")[2].isdigit()}
    if len(layers) != cfg.num_hidden_layers:
        raise SparsambaError(
            f"{where}: num_hidden_layers is {cfg.num_hidden_layers}, but the weights hold {len(layers)} layers; "
            "the weights and config.json disagree"
        )
    # every other size: the shapes a model of this config would have, built on the meta device
    # (no memory), against the headers
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    for k, shape in expected.items():
        if k in shapes and tuple(shapes[k]) != shape:
            raise SparsambaError(
                f"{where}: tensor {k} has shape {tuple(shapes[k])}, config.json implies {shape}; "
                "the weights and config.json disagree"
            )


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = _safetensors_files(model_dir)
    if files is not None:
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(_read_safetensors(f))
        return sd
    binf = model_dir / "pytorch_model.bin"
    if binf.is_file():
        try:  # weights_only: never run pickled code from a checkpoint
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle
            raise SparsambaError(
                f"{binf}: cannot load as plain tensors ({e}); convert it to safetensors"
            ) from None
        if not isinstance(sd, dict):
            raise SparsambaError(f"{binf}: expected a state dict of tensors")
        return sd
    raise SparsambaError(f"{model_dir}: no model.safetensors (or sharded safetensors, or pytorch_model.bin)")


def build_model(cfg: MambaConfig) -> MambaLM:
    return ARCHS[cfg.model_type][1](cfg)


def load_state(model: nn.Module, sd: dict[str, torch.Tensor], where: Path) -> None:
    """Load ``sd`` into ``model``, checking every name and shape against the config first."""
    sd = _rename_state_spaces(sd)
    expected = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", True)
    if tied:
        sd.pop("lm_head.weight", None)  # tied: the head is the embedding (some files store both)
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing:
        raise SparsambaError(
            f"{where}: {len(missing)} tensors missing from the weights, e.g. {missing[:3]}; "
            "the weights do not belong to this config.json"
        )
    if extra:
        raise SparsambaError(
            f"{where}: unexpected tensors {extra[:3]} (…{len(extra)} in all); the weights do not match config.json"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise SparsambaError(
                f"{where}: tensor {k} has shape {tuple(sd[k].shape)}, config.json implies {tuple(v.shape)}; "
                "the weights and config.json disagree"
            )
        if not sd[k].is_floating_point():
            raise SparsambaError(f"{where}: tensor {k} has dtype {sd[k].dtype}; expected floating point")
        if not torch.isfinite(sd[k]).all():
            # every later figure would be nan (a perplexity of nan once printed with exit code 0)
            raise SparsambaError(f"{where}: tensor {k} holds NaN or infinite values; the weights are corrupt")
    model.load_state_dict(sd, strict=False)
    if tied:
        model.lm_head.weight = model.backbone.embeddings.weight


def resolve(model: str | Path) -> Path:
    """A local directory as it is; otherwise a hub id, downloaded (safetensors, config, tokenizer)."""
    p = Path(model)
    if p.exists():
        if not p.is_dir():
            raise SparsambaError(f"{p}: is a file; give the model's directory (holding config.json)")
        return p
    s = str(model)
    if s.count("/") != 1 or s.startswith((".", "/")):
        raise SparsambaError(f"{s}: no such directory (and not a hub id like 'state-spaces/mamba-130m-hf')")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"])
        )
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
        raise SparsambaError(
            f"{s}: not a local directory, and downloading it from the hub failed ({type(e).__name__}: {e}); "
            "check the name and your network, or download it and pass the directory"
        ) from None


def load_model(model: str | Path, dtype: torch.dtype = torch.float32) -> MambaLM:
    """An HF-format Mamba / Mamba-2 directory (or hub id) -> our reference model, in eval mode."""
    d = resolve(model)
    cfg = read_config(d)
    check_config_fits_weights(cfg, d)
    m = build_model(cfg)
    load_state(m, read_weights(d), d)
    return m.to(dtype).eval()


def load_tokenizer(model: str | Path):
    """The ``tokenizers.Tokenizer`` of a model directory, or None if it has no tokenizer.json."""
    from tokenizers import Tokenizer

    p = resolve(model) / "tokenizer.json"
    if not p.is_file():
        return None
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
        raise SparsambaError(f"{p}: not a valid tokenizers file ({e})") from None


def _copy_tokenizer(tokenizer_dir: str | Path | None, dest: Path) -> None:
    if tokenizer_dir is None:
        return
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy(src, dest / name)


def save_model(
    model: MambaLM,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an HF-format directory (config.json, model.safetensors, tokenizer files, extras) atomically."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
        _copy_tokenizer(tokenizer_dir, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return write_dir_atomically(out, fill, overwrite)


class LogitsOnly(nn.Module):
    """A transformers causal LM (LLaMA-style, any non-Mamba architecture) seen as ids -> logits, so
    the pruner and the evaluator treat it like our references."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids, use_cache=False).logits


def load_any(model: str | Path) -> nn.Module:
    """Our reference for Mamba / Mamba-2 directories; transformers' AutoModelForCausalLM (wrapped in
    ``LogitsOnly``) for any other architecture, such as LLaMA-style models."""
    d = resolve(model)
    path = d / "config.json"
    try:
        mt = json.loads(path.read_text()).get("model_type") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        mt = None
    if mt is None or mt in ARCHS or mt == "falcon_mamba":
        return load_model(d)
    from transformers import AutoModelForCausalLM

    try:
        inner = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad directory
        raise SparsambaError(
            f"{d}: transformers cannot load this {mt!r} model ({type(e).__name__}: {e})"
        ) from None
    return LogitsOnly(inner).eval()


def save_any(
    model: nn.Module,
    out: str | Path,
    tokenizer_dir: str | Path | None,
    extra_files: dict[str, str],
    overwrite: bool,
) -> Path:
    """``save_model`` for our references; transformers' ``save_pretrained`` (atomically) otherwise."""
    if not isinstance(model, LogitsOnly):
        return save_model(
            model, out, tokenizer_dir=tokenizer_dir, extra_files=extra_files, overwrite=overwrite
        )

    def fill(tmp: Path) -> None:
        model.inner.save_pretrained(tmp)
        _copy_tokenizer(tokenizer_dir, tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text)

    return write_dir_atomically(out, fill, overwrite)
