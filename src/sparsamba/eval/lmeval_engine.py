"""A packed GGUF as an lm-evaluation-harness model: the native engine's logits give the loglikelihoods,
so the accuracy measured is that of the file a user ships (its f16 / int8 rounding included), not of its
torch twin.

Imported only where lm-eval is installed (the ``eval`` extra). The requests are encoded as lm-eval's
``hf`` model encodes them (``TemplateLM``: trailing spaces of the context move to the continuation,
the whole string is encoded and split at the context's length; an empty context is the end-of-text
token), and a sequence longer than ``max_length`` keeps its last ``max_length`` tokens, so the two
models score the same token sequences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lm_eval import utils
from lm_eval.api.model import TemplateLM

from ..errors import SparsambaError

MAX_LENGTH = 2048  # lm-eval's hf model's default for a config without a context length (Mamba)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class EngineHarnessLM(TemplateLM):
    """lm-eval's LM interface over ``runtime.engine.Engine`` (one sequence at a time, each from a fresh
    state): loglikelihood, loglikelihood_rolling and greedy generate_until."""

    def __init__(self, path: str | Path, threads: int | None = None, max_length: int = MAX_LENGTH):
        from ..gguf_io import gguf_eos_token_id
        from ..runtime.engine import Engine

        super().__init__()
        if not isinstance(max_length, int) or max_length < 2:
            raise SparsambaError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.path = Path(path)
        self.engine = Engine(self.path, threads=threads)
        self.tok = self.engine.tokenizer()
        eos = gguf_eos_token_id(self.path)
        if eos is None:
            self.close()
            raise SparsambaError(f"{self.path}: the GGUF states no end-of-text token, which lm-eval needs")
        self._eot = eos
        self.max_length = max_length

    # ------------------------------------------------------------- TemplateLM
    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether each token is the argmax."""
        if not continuation:
            return 0.0, True
        inp = (context + continuation)[-(self.max_length + 1) :][:-1]
        logits = self.engine.logits(inp)  # (len(inp), V), fresh state
        lp = _log_softmax(logits[-len(continuation) :])
        cont = np.asarray(continuation)
        ll = float(lp[np.arange(len(cont)), cont].sum())
        return ll, bool((lp.argmax(axis=-1) == cont).all())

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in requests:
            res = self._score(context, continuation)
            if key is not None and self.cache_hook is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole string's log-likelihood in disjoint windows of at most ``max_length`` tokens,
        each conditioned on the tokens before it in its window (lm-eval's rolling scheme)."""
        out = []
        for (string,) in [req.args for req in requests]:
            windows = map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            out.append(sum(self._score(ctx, cont)[0] for ctx, cont in windows))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation, cut at the first of the request's ``until`` strings."""
        out = []
        for context, gen_kwargs in [req.args for req in requests]:
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", 256))
            if kw.get("do_sample") or kw.get("temperature", 0.0):
                raise SparsambaError("the engine's lm-eval model generates greedily only (do_sample=False)")
            prompt = self.tok_encode(context)[-self.max_length :]
            ids = self.engine.generate(prompt, n, eos_token_id=self._eot)
            text = self.tok.decode(ids)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out

    def close(self) -> None:
        self.engine.close()
