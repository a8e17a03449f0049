"""`SMoALM`: lm-eval's `smoa_mlx` model, mlx-lm's own lm-eval model (`mlx_lm.evaluate.MLXLM`:
generation, rolling log-likelihood, chat templates) on a base loaded with its adapter by
`loader.load_base`, scoring `loglikelihood` requests as `smoa_mlx.evaluate` scores choices.

Tokenization boundary: lm-eval hands over (context, continuation) strings. Each
continuation is tokenised together with its context and scored from the first token
where that departs from the context's own tokens (`evaluate.continuation_tokens`), so a
word piece merging across the cut is scored once and the scores equal
`smoa_mlx.evaluate --mode loglik`'s for the same prompt and options (lm-eval's default,
context tokens then the rest of the joint tokens, can drop or double such a piece).
"""

from __future__ import annotations

from collections import defaultdict

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from mlx_lm.evaluate import DEFAULT_MAX_TOKENS, MLXLM
from tqdm import tqdm

from ..errors import ConfigError
from ..evaluate import continuation_logprobs, continuation_tokens
from ..loader import load_base
from . import MODEL

DEFAULT_BATCH_SIZE = 8  # mlx-lm's; also for lm-eval's "auto"


@register_model(MODEL)
class SMoALM(MLXLM):
    """model_args: `model` (what `--model` takes everywhere: a directory, hub id, .gguf,
    ollama:NAME), `adapter_path` (an adapter directory, applied unfused), `batch_size`
    (sequences scored or generated at once), `max_tokens` (generation cap over the
    tasks' own; the context kept when scoring), `use_chat_template` (with lm-eval's
    --apply_chat_template: the rendered prompt brings its own BOS), `trust_remote_code`.
    lm-eval also passes `max_batch_size` and `device`, which mean nothing to MLX."""

    def __init__(self, model: str, adapter_path: str | None = None, batch_size=DEFAULT_BATCH_SIZE,
                 max_tokens: int | None = None, use_chat_template: bool = False,
                 trust_remote_code: bool = False, max_batch_size=None, device=None) -> None:
        LM.__init__(self)
        self._model, self.tokenizer, _, _ = load_base(
            str(model), adapter_path, tokenizer_config={"trust_remote_code": trust_remote_code})
        self._batch_size = _batch_size(batch_size)
        self._max_tokens = max_tokens
        self.use_chat_template = use_chat_template
        self._sampler = None  # greedy, as lm-eval's generate_until asks

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each continuation; the continuations of one context
        are scored together, `batch_size` at a time, on one shared prompt cache."""
        groups = defaultdict(list)
        for i, request in enumerate(requests):
            groups[request.args[0]].append(i)
        prefix = self.tokenizer.bos_token_id
        prefix = self.tokenizer.eos_token_id if prefix is None else prefix
        limit = (self._max_tokens or DEFAULT_MAX_TOKENS) + 1
        results = [None] * len(requests)
        for context, indices in tqdm(groups.items(), desc="loglikelihood", disable=len(groups) < 2):
            for at in range(0, len(indices), self._batch_size):
                chunk = indices[at:at + self._batch_size]
                seqs, starts = continuation_tokens(
                    self.tokenizer, context, [requests[i].args[1] for i in chunk],
                    add_special_tokens=not self.use_chat_template, prefix_token=prefix)
                cut = max(max(map(len, seqs)) - limit, 0)  # keep the latest context, as mlx-lm
                seqs, starts = [s[cut:] for s in seqs], [max(s - cut, 1) for s in starts]
                sums, _, greedy = continuation_logprobs(self._model, seqs, starts)
                for i, value, best in zip(chunk, sums.tolist(), greedy.tolist()):
                    results[i] = (value, best)
                    self.cache_hook.add_partial("loglikelihood", requests[i].args, results[i])
        return results


def _batch_size(value) -> int:
    """lm-eval's batch size: a count, or "auto" / "auto:N" (then mlx-lm's default)."""
    if str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(f"batch_size must be a positive integer or auto, got {value!r}")
    return size
