"""What a prune run is asked to do: the one config, checked once when it is built.

A ``PruneConfig`` that exists is valid: every check of method, pattern, target and their combination
is in ``__post_init__``, so the walker (run.py) and the methods (methods.py) trust it. Its ``pattern``
is the parsed ``Pattern`` (a spec string given to the constructor is parsed there, once).

The sparsity target is a fraction of the prunable weights in [0, 1): 1.0 would remove every prunable
weight of the model, which no method is meant for. (The layer functions ``mask_from_scores`` and
``sparsegpt_prune`` keep their own argument check of [0, 1], where 1.0 is a whole layer removed.)

Recipes (TOML, ``recipes/*.toml``, ``sparsamba prune --recipe``) become a config in ``from_recipe``
and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from ..errors import SparsambaError
from .learn import LearnConfig
from .methods import METHODS, SCORES
from .pattern import Pattern, parse_pattern


@dataclass(frozen=True)
class PruneConfig:
    method: str = "c4"  # a key of methods.METHODS
    pattern: Pattern | str = "c4"  # a spec string is parsed in __post_init__; afterwards a Pattern
    sparsity: float | None = None  # unstructured and c4 (learned); implied by fixed patterns
    scope: str = "block"  # c4 sparsity target: uniform per block ("block") or over the model ("global")
    latency: float | None = None  # c4: target latency, in the table's unit
    latency_table: dict | None = field(default=None, repr=False)
    loss_budget: float | None = None  # c4: max effectiveness-loss ratio (L_sparse − L_dense) / L_dense
    compensate: bool | None = None  # default: on for c4, off for magnitude / wanda (sparsegpt has its own)
    score: str = "obs"  # c4 masks: "obs" (W²/[H⁻¹]_jj), "wanda" or "magnitude" (a key of methods.SCORES)
    select: str = "sparsegpt"  # c4 masks chosen by SparseGPT's sequential OBS ("sparsegpt") or by score
    damp: float = 0.01  # SparseGPT's and the OBS score's damping
    compensate_damp: float = 0.001  # γ of compensation (the paper's ablation)
    include_lm_head: bool = False
    true_sequential: bool = (
        True  # gather each layer's statistics after the layers before it in its block are pruned
    )
    learn: LearnConfig = field(default_factory=LearnConfig)
    debug: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SparsambaError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        p = parse_pattern(self.pattern)
        object.__setattr__(self, "pattern", p)
        if p.kind == "c4" and self.method != "c4":
            raise SparsambaError(f"pattern 'c4' (n learned per row) needs --method c4, not {self.method}")
        if self.method == "c4" and p.kind not in ("c4", "c4n"):
            raise SparsambaError(f"method c4 takes pattern c4 (learned) or c4n1/c4n2/c4n3, not {p}")
        targets = [t for t in (self.sparsity, self.latency, self.loss_budget) if t is not None]
        if len(targets) > 1:
            raise SparsambaError("give one target: --sparsity, --latency or --loss-budget")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:  # NaN fails too
            raise SparsambaError(
                f"sparsity must be in [0, 1), the fraction of prunable weights removed; got {self.sparsity}"
            )
        if p.kind in ("c4n", "nm") and self.sparsity is not None:
            implied = 1 - p.n_kept / p.group
            if abs(self.sparsity - implied) > 1e-9:
                raise SparsambaError(
                    f"pattern {p} fixes sparsity at {implied:.0%}; drop --sparsity or use pattern "
                    f"{'c4' if self.method == 'c4' else 'unstructured'} to reach {self.sparsity:.0%}"
                )
        if p.kind == "unstructured" and self.sparsity is None:
            raise SparsambaError("pattern unstructured needs --sparsity")
        if p.kind == "c4" and not targets:
            raise SparsambaError(
                "pattern c4 needs a target: --sparsity S, --latency T with --latency-table, or --loss-budget R"
            )
        if p.kind != "c4" and (self.latency is not None or self.loss_budget is not None):
            raise SparsambaError(
                "--latency and --loss-budget need the learned pattern c4 (--method c4 --pattern c4)"
            )
        if self.latency is not None and self.latency_table is None:
            raise SparsambaError(
                "--latency needs --latency-table FILE (from `sparsamba profile` or the cost model)"
            )
        if self.loss_budget is not None and not self.loss_budget > 0:
            raise SparsambaError(f"--loss-budget must be a positive ratio, got {self.loss_budget}")
        if self.score not in SCORES:
            raise SparsambaError(f"unknown score {self.score!r}; use {', '.join(SCORES)}")
        if self.scope not in ("block", "global"):
            raise SparsambaError(f"unknown scope {self.scope!r}; use block or global")

    def to_dict(self) -> dict:
        """JSON-able fields for the report (the pattern as its spec, the latency table left out)."""
        d = {k: v for k, v in asdict(self).items() if k != "latency_table"}
        d["pattern"] = str(self.pattern)
        return d


# fields a recipe may set; [learn] takes LearnConfig's
RECIPE_KEYS = frozenset(f.name for f in dataclasses.fields(PruneConfig)) - {"latency_table", "learn", "debug"}


def from_recipe(recipe: str | None = None, learn: dict | None = None, **overrides) -> PruneConfig:
    """The config of a recipe file (TOML: a [prune] table and its [prune.learn]; or the same keys at
    the top level) with ``overrides`` (PruneConfig fields) and ``learn`` (LearnConfig fields) on top.
    An override of None is one not given: the recipe's value, else the default, stands."""
    r = _read_recipe(recipe) if recipe else {}
    learn_kw = {**r.pop("learn", {}), **{k: v for k, v in (learn or {}).items() if v is not None}}
    kw = {**r, **{k: v for k, v in overrides.items() if v is not None}}
    return PruneConfig(**kw, learn=LearnConfig(**learn_kw))


def _read_recipe(path: str) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            r = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SparsambaError(f"{path}: cannot read recipe ({e})") from None
    r = r.get("prune", r)
    learn_keys = {f.name for f in dataclasses.fields(LearnConfig)}
    bad = [k for k in r if k not in RECIPE_KEYS and k != "learn"]
    bad += [f"learn.{k}" for k in r.get("learn", {}) if k not in learn_keys]
    if bad:
        raise SparsambaError(
            f"{path}: unknown recipe keys {bad}; known: {sorted(RECIPE_KEYS)} and [learn] {sorted(learn_keys)}"
        )
    return r
