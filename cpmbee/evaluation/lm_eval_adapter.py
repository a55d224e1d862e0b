"""CPM-Bee as an lm-evaluation-harness model: ``lm_eval`` with ``--model cpmbee``.

Importing this module registers the model name ``cpmbee`` (needs the ``eval`` extra: ``pip install
'cpmbee[eval]'``). lm-eval only knows models it has imported, so run its CLI through ``cpmbee lm-eval`` (which imports this
module first and hands every argument to lm-eval)::

    cpmbee lm-eval run --model cpmbee --model_args pretrained=path/to/model --batch_size 8 --tasks copa

or from Python ``lm_eval.simple_evaluate(model=CpmBeeLM(...), tasks=[...])``.

**How plain (context, continuation) maps onto CPM-Bee.** The harness speaks plain text; CPM-Bee only
predicts the ``<ans>`` segment of a structured dict. Every request becomes (texts escaped, ``<`` → ``<<``)

    {"input": context, "<ans>": continuation}

the layout of the pre-training LM transform (``configs/pretrain/transforms/lm.py``), so the continuation
is read as the model's answer to the context:

* ``loglikelihood`` — the sum of log-probabilities of the continuation's tokens, each predicted from the
  answer segment's ``<s>``, the tokens before it and the whole context; ``is_greedy`` — each of those
  tokens is the highest-scoring allowed column (as CPM-Bee generation restricts them). The closing ``</s>``
  is not scored unless ``score_eos=True`` (then the score also says "and the answer ends here", which
  can help multiple-choice tasks whose options are whole answers). The continuation is tokenized on its
  own, so a leading space stays part of it. Contexts too long for ``max_length`` lose their beginning.
* ``loglikelihood_rolling`` — the text's total log-likelihood in windows of ``window`` tokens, each read
  with the window before it as ``input`` (``cpmbee.evaluation.perplexity``): every token scored once,
  no ``</s>``.
* ``generate_until`` — ``cpmbee.generation.generate`` on ``{"input": context, "<ans>": ""}``, greedy
  (``beam_size=1``) unless the request asks for ``do_sample``, at most ``max_gen_toks`` tokens (default
  256), stopped at the first ``until`` string, which is cut off; the answer is unescaped.

Structured benchmarks (choice questions with ``options``) score better in CPM-Bee's own format than as
plain text: ``docs/evaluation.md`` maps ZeroCLUE and English tasks onto it for ``cpmbee eval``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cpmbee.evaluation.lm_eval_adapter needs lm-evaluation-harness: pip install 'cpmbee[eval]'"
    ) from err

from ..model import CpmBeeForCausalLMBase
from ..tokenizer import SPECIAL, CpmBeeTokenizerBase, escape, unescape
from .likelihood import score_answers
from .perplexity import score_texts

__all__ = ["CpmBeeLM", "to_bee_input"]

logger = logging.getLogger(__name__)

_STRUCTURE_TOKENS = 16  # room for root, keys and <s>/</s> of the two segments


def to_bee_input(context: str, continuation: str) -> dict[str, str]:
    """The CPM-Bee sample of one plain (context, continuation) request (module docstring)."""
    return {"input": escape(context), "<ans>": escape(continuation)}


def _keep_tail(tokenizer: CpmBeeTokenizerBase, text: str, tokens: int) -> str:
    """The last ``tokens`` tokens of escaped ``text`` (cut on a token boundary, still escaped)."""
    pieces = tokenizer.pieces(text)
    if len(pieces) <= tokens:
        return text
    kept = pieces[len(pieces) - max(tokens, 0) :]
    return "".join(p.text if p.kind == SPECIAL else escape(p.text) for p in kept)


@register_model("cpmbee")
class CpmBeeLM(LM):
    """lm-eval ``LM`` over a CPM-Bee model.

    Args:
        pretrained: model directory for ``cpmbee.api.load_model_and_tokenizer`` (None: the embedded model).
        model, tokenizer: an already loaded model and tokenizer instead of ``pretrained``.
        batch_size: requests per forward / generate call (``"auto"`` means 8).
        device, dtype: where and how to load ``pretrained``.
        max_length: most tokens of one scored request; longer contexts lose their beginning.
        window: ``loglikelihood_rolling`` window in tokens.
        score_eos: also score the closing ``</s>`` in ``loglikelihood``.
        max_batch_size: accepted for lm-eval's interface; unused.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: CpmBeeForCausalLMBase | None = None,
        tokenizer: CpmBeeTokenizerBase | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | str = 2048,
        window: int | str = 256,
        score_eos: bool | str = False,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if (model is None) != (tokenizer is None):
            raise ValueError("model and tokenizer: give both or neither")
        if model is None:
            import torch

            from ..api import load_model_and_tokenizer

            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line asks for "cuda" unless told otherwise
                logger.warning("device %r: CUDA is not available, loading on the CPU", device)
                device = "cpu"

            model, tokenizer = load_model_and_tokenizer(pretrained, device=device, dtype=dtype)
        elif pretrained is not None:
            raise ValueError("pretrained: give a path or a loaded model, not both")
        assert model is not None and tokenizer is not None
        model.eval()
        self.model: CpmBeeForCausalLMBase = model
        self.tokenizer: CpmBeeTokenizerBase = tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else _positive("batch_size", batch_size)
        self.max_length = _positive("max_length", max_length)
        self.window = _positive("window", window)
        self.score_eos = str(score_eos).lower() in ("true", "1", "yes")
        from ..objective import AnswerObjective

        self.objective = AnswerObjective(self.model, unk_id=tokenizer.unk_id)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return "cpmbee"

    # ------------------------------------------------------------------------------------------ likelihood
    def _fit(self, context: str, continuation: str) -> dict[str, str]:
        sample = to_bee_input(context, continuation)
        room = self.max_length - _STRUCTURE_TOKENS - len(self.tokenizer.pieces(sample["<ans>"]))
        if room < 0:
            raise ValueError(f"a continuation is longer than max_length={self.max_length} tokens")
        sample["input"] = _keep_tail(self.tokenizer, sample["input"], room)
        return sample

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` per request (module docstring)."""
        from ..data.finetune import FinetuneCollator

        samples = [self._fit(*req.args) for req in requests]
        collator = FinetuneCollator(self.tokenizer, max_length=self.max_length, truncation=False)
        with _bar(len(samples), "loglikelihood", disable_tqdm) as bar:
            scores = score_answers(
                self.objective, samples, collator, batch_size=self.batch_size, progress=bar.update
            )
        results = []
        for req, score in zip(requests, scores):
            result = (-score.nll(self.score_eos), score.greedy(self.score_eos))
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text, window by window (module docstring)."""
        texts = [req.args[0] for req in requests]
        with _bar(None, "loglikelihood_rolling", disable_tqdm) as bar:
            scores = score_texts(
                self.objective,
                self.tokenizer,
                texts,
                window=self.window,
                batch_size=self.batch_size,
                progress=bar.update,
            )
        results = []
        for req, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, -score.nll)
            results.append(-score.nll)
        return results

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations, cut at the first ``until`` string (module docstring)."""
        from ..generation import generate

        groups: dict[str, list[int]] = {}  # requests with the same options are batched together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str] = [""] * len(requests)
        with _bar(len(requests), "generate_until", disable_tqdm) as bar:
            for indices in groups.values():
                gen_kwargs = dict(requests[indices[0]].args[1])
                until = gen_kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                options: dict[str, Any] = {
                    "beam_size": 1,
                    "max_new_tokens": int(gen_kwargs.pop("max_gen_toks", 256)),
                    "stop": [escape(s) for s in until if s],
                }
                if gen_kwargs.pop("do_sample", False):
                    options["do_sample"] = True
                    for key in ("temperature", "top_k", "top_p", "seed"):
                        if key in gen_kwargs:
                            options[key] = gen_kwargs[key]
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    prompts = [self._fit(requests[i].args[0], "") for i in chunk]
                    outputs = generate(self.model, self.tokenizer, prompts, **options)
                    for i, out in zip(chunk, outputs):
                        text = unescape(out["<ans>"] or "")
                        for stop in until:
                            if stop and stop in text:
                                text = text[: text.index(stop)]
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return results


def _positive(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def _bar(total: int | None, what: str, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"cpmbee {what}", disable=disable)
