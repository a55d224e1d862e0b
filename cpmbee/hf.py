"""The transformers surface: the classes users load, and transformers' own calls on top of the core.

``CpmBeeTokenizer`` and ``CpmBeeForCausalLM`` (exported from ``cpmbee``, registered with the Auto classes)
are the core classes (``cpmbee.tokenizer``, ``cpmbee.model``) plus the calls that need the layers above
them, so the core itself reads bottom-up: tokenizer ← prompt ← model ← generation ← this module.

Two call styles, both working on the same objects:

* the model card's, on CPM-Bee dicts: ``model.generate(data_or_list, tokenizer, **options)`` (options:
  ``cpmbee.generation.GenerationOptions``), ``model(**tokenizer(data, return_tensors="pt"))``,
  ``tokenizer.prepare_for_finetune(data)`` → ``model(**batch).loss``;
* transformers', on plain text: ``tokenizer(text)`` gives the ``input_ids``/``attention_mask`` of the
  plain-text layout ``{"input": text, "<ans>": ""}`` (``cpmbee.prompt.plain_text_input``),
  ``model.generate(**inputs)`` fills its answer with a ``GenerationConfig`` (greedy, sampling, ``num_beams``
  beam search) and returns ``input_ids`` + the answer's ids, as transformers does, so
  ``pipeline("text-generation", model=model, tokenizer=tokenizer)`` works. ``tokenizer.encode``/``decode``
  round-trip text.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from transformers import BatchEncoding, GenerationConfig, GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .config import CpmBeeConfig
from .data.finetune import prepare_for_finetune
from .dtypes import compute_dtype
from .generation import ConfigVocabulary, generate, generate_tokens
from .generation_options import GenerationOptions
from .model import CpmBeeForCausalLMBase
from .prompt import PromptBatch, collate_prompts, encode_prompt, plain_text_input, plain_text_prompt
from .tokenizer import CpmBeeTokenizerBase, Vocabulary

__all__ = ["CpmBeeForCausalLM", "CpmBeeTokenizer", "PromptEncoding", "register_auto_classes"]


def _is_structured(data: Any) -> bool:
    """A CPM-Bee dict or a non-empty list of them."""
    return isinstance(data, Mapping) or (
        isinstance(data, (list, tuple)) and len(data) > 0 and isinstance(data[0], Mapping)
    )


def _device_of(device_map: Any) -> str | None:
    """Where ``from_pretrained(device_map=...)`` puts the model: ``"cpu"``, ``"cuda"`` or ``None``
    (undecided: this machine's accelerator when it has one)."""
    if device_map is None or device_map == "auto":
        return None
    if isinstance(device_map, Mapping):
        places = {str(v) for v in device_map.values()}
        return "cpu" if places <= {"cpu", "disk"} else "cuda"
    return "cpu" if torch.device(device_map).type == "cpu" else "cuda"


def _is_text(data: Any) -> bool:
    return isinstance(data, str) or (
        isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(t, str) for t in data)
    )


class PromptEncoding(BatchEncoding):
    """``tokenizer(data)`` of CPM-Bee dicts: the model inputs, plus the ``PromptBatch`` they came from
    (answer slots, ext tables) as ``.prompt_batch``."""

    prompt_batch: PromptBatch


# options of transformers' tokenizer call that the plain-text path honours
_TEXT_CALL_OPTIONS = frozenset(
    {"return_tensors", "padding", "max_length", "pad_to_multiple_of", "padding_side", "return_attention_mask"}
)


class CpmBeeTokenizer(CpmBeeTokenizerBase):
    """The CPM-Bee tokenizer, with calls on structured inputs and plain text.

    * ``tokenizer(data)`` on a CPM-Bee dict or a list of them: a left-padded generation batch, so
      ``model(**tokenizer(data, return_tensors="pt"))`` runs the prompts; ``.prompt_batch`` holds its
      ``PromptBatch``.
    * ``tokenizer(text)`` on a string or a list of strings: ``input_ids``/``attention_mask`` of the plain-text
      layout (``cpmbee.prompt.plain_text_input``), for ``model.generate(**inputs)`` and pipelines; the text is
      taken literally (``<`` is escaped) and characters outside the vocabulary are ``<unk>``.
    * ``prepare_for_finetune(data, max_length)``: dicts with filled answers → a training batch with
      ``labels`` (``cpmbee.data.finetune.prepare_for_finetune``).
    """

    def __call__(self, text: Any = None, *args: Any, **kwargs: Any) -> BatchEncoding:
        if _is_structured(text):
            if args:
                raise TypeError("tokenizer(data): CPM-Bee dicts take no second positional argument")
            return self._encode_structured(text, **kwargs)
        if _is_text(text) and not args and kwargs.get("text_pair") is None:
            return self._encode_text(text, **kwargs)
        encoding: BatchEncoding = super().__call__(text, *args, **kwargs)
        return encoding

    def _encode_structured(
        self, data: Any, return_tensors: str | None = None, device: Any = None, **options: Any
    ) -> PromptEncoding:
        """``padding`` and ``add_special_tokens`` change nothing (the batch is always left-padded, segments
        frame every text); other transformers options do not apply to CPM-Bee dicts."""
        unsupported = sorted(set(options) - {"padding", "add_special_tokens"})
        if unsupported:
            raise TypeError(f"tokenizer(data): unsupported option(s) {unsupported} for CPM-Bee dicts")
        rows = [data] if isinstance(data, Mapping) else list(data)
        batch = collate_prompts(self, [encode_prompt(self, row) for row in rows])
        content: dict[str, Any]
        if return_tensors == "pt":
            content = dict(batch.model_inputs(device))
        elif return_tensors in (None, "np"):
            content = batch.arrays()
            if return_tensors is None:
                content = {k: v.tolist() for k, v in content.items()}
        else:
            raise ValueError(
                f"return_tensors must be 'pt', 'np' or None for structured inputs, got {return_tensors!r}"
            )
        encoding = PromptEncoding(content)
        encoding.prompt_batch = batch
        return encoding

    def _encode_text(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        truncation: Any = None,
        **options: Any,
    ) -> BatchEncoding:
        """``add_special_tokens`` changes nothing: the layout's segments frame the text."""
        unsupported = sorted(set(options) - _TEXT_CALL_OPTIONS)
        if unsupported:
            raise TypeError(f"tokenizer(text): unsupported option(s) {unsupported}")
        if truncation:
            raise ValueError(
                "tokenizer(text): truncation is not supported (it would cut the prompt's layout)"
            )
        texts = [text] if isinstance(text, str) else list(text)
        ids = [encode_prompt(self, plain_text_input(t)).ids.tolist() for t in texts]
        batched = not isinstance(text, str) or options.get("return_tensors") is not None
        options.setdefault("return_attention_mask", True)
        return self.pad({"input_ids": ids if batched else ids[0]}, **options)

    def prepare_for_finetune(self, data: Any, max_length: int = 2048, **options: Any) -> Any:
        """Samples with filled ``<ans>`` → a padded training batch with ``labels`` for ``model(**batch).loss``;
        the options and the truncation policy: ``cpmbee.data.finetune.prepare_for_finetune``."""
        return prepare_for_finetune(self, data, max_length, **options)


# GenerationConfig fields and what they become; transformers' defaults for the ones left unset (None)
_FROM_CONFIG = {
    "num_beams": ("beam_size", 1),
    "do_sample": ("do_sample", False),
    "temperature": ("temperature", 1.0),
    "top_k": ("top_k", 50),
    "top_p": ("top_p", 1.0),
    "repetition_penalty": ("repetition_penalty", 1.0),
}
# fields read separately, or that change nothing here
_HANDLED = frozenset(
    {
        *_FROM_CONFIG,
        "max_new_tokens",
        "max_length",
        "min_new_tokens",
        "min_length",
        "stop_strings",
        "num_return_sequences",
        "return_dict_in_generate",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "use_cache",
        "transformers_version",
    }
)


def _setting(config: GenerationConfig, name: str, default: Any) -> Any:
    value = getattr(config, name, None)
    return default if value is None else value


def options_from_generation_config(config: GenerationConfig, prompt_length: int) -> GenerationOptions:
    """CPM-Bee generation options for a transformers ``GenerationConfig`` (a prompt of ``prompt_length``
    tokens, for ``max_length``); a setting CPM-Bee generation does not implement is a ``ValueError``."""
    defaults: dict[str, Any] = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    unsupported = sorted(
        name
        for name, value in config.to_diff_dict().items()
        if name not in _HANDLED and not name.startswith("_") and value != defaults.get(name, value)
    )
    if unsupported:
        raise ValueError(f"generate: CPM-Bee generation does not support {unsupported}")
    if _setting(config, "num_return_sequences", 1) != 1:
        raise ValueError("generate: num_return_sequences must be 1")
    max_new = config.max_new_tokens
    if max_new is None and config.max_length is None:
        # not transformers' max_length=20: it counts the prompt, and the layout alone is a dozen tokens
        max_new = GenerationOptions.model_fields["max_new_tokens"].default
    elif max_new is None:
        max_new = config.max_length - prompt_length
        if max_new < 1:
            raise ValueError(
                f"generate: max_length={config.max_length} leaves no room after the {prompt_length}-token "
                "prompt; give max_new_tokens"
            )
    min_new = config.min_new_tokens or max(0, _setting(config, "min_length", 0) - prompt_length)
    options: dict[str, Any] = {
        name: _setting(config, hf, default) for hf, (name, default) in _FROM_CONFIG.items()
    }
    if not options["do_sample"]:
        for name in ("temperature", "top_k", "top_p"):
            options.pop(name)  # sampling settings do nothing without sampling (transformers ignores them too)
    stop = config.stop_strings
    options.update(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        seed=int(torch.randint(0, 2**62, (1,)).item()) if options["do_sample"] else None,  # torch's RNG
    )
    return GenerationOptions.parse(options)


class CpmBeeForCausalLM(CpmBeeForCausalLMBase, GenerationMixin):
    """CPM-Bee for generation and training: the network (``CpmBeeForCausalLMBase``) plus ``generate``.

    ``generate(data, tokenizer, **options)`` fills the ``<ans>`` slots of a CPM-Bee dict or a list of them
    (``cpmbee.generation.generate``: the original's beam search by default). ``generate(input_ids,
    attention_mask=..., generation_config=..., **settings)`` is transformers' call on the ids of
    ``tokenizer(text)``: it returns ``input_ids`` followed by the generated ids (the answer and its ``</s>``,
    then ``pad_token_id``), or a ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate``. Settings
    as transformers' (greedy by default, ``do_sample``, ``num_beams``, ``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``min_new_tokens``, ``stop_strings`` with ``tokenizer=``); ``max_new_tokens``
    defaults to 100, as CPM-Bee's own ``generate``. Others raise ``ValueError``.
    """

    def generate(self, inputs: Any = None, generation_config: Any = None, **kwargs: Any) -> Any:
        if inputs is None and "data" in kwargs:  # generate(data=..., tokenizer=...)
            inputs = kwargs.pop("data")
        if _is_structured(inputs):
            tokenizer = generation_config if generation_config is not None else kwargs.pop("tokenizer", None)
            if not isinstance(tokenizer, CpmBeeTokenizerBase):
                raise TypeError(
                    "model.generate(data, tokenizer, **options): give the CpmBeeTokenizer after the CPM-Bee data"
                )
            return generate(self, tokenizer, inputs, **kwargs)
        if isinstance(generation_config, CpmBeeTokenizerBase):
            raise ValueError("model.generate(data, tokenizer): data must be a CPM-Bee dict or a list of them")
        return self._generate_from_ids(inputs, generation_config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader with the dtype rule of ``cpmbee.dtypes``: without ``dtype`` (or with
        ``"auto"``) the model computes in float32 on a CPU and in its checkpoint's dtype on a GPU; half
        precision asked for on a CPU warns."""
        requested = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        dtype = compute_dtype(
            None if requested == "auto" else requested, _device_of(kwargs.get("device_map"))
        )
        kwargs["dtype"] = "auto" if dtype is None else dtype
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _generate_from_ids(
        self,
        inputs: torch.Tensor | None,
        generation_config: GenerationConfig | None,
        attention_mask: torch.Tensor | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput:
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                "generate: give the input_ids of tokenizer(text) as a (batch, length) tensor, or a CPM-Bee "
                "dict and the tokenizer: model.generate(data, tokenizer)"
            )
        config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(
                f"generate(input_ids): unsupported argument(s) {sorted(unused)}; plain input_ids take the layout "
                "of tokenizer(text), CPM-Bee dicts go to model.generate(data, tokenizer)"
            )
        vocab: Vocabulary = (
            tokenizer if isinstance(tokenizer, CpmBeeTokenizerBase) else ConfigVocabulary.of(self)
        )
        rows = self._rows(input_ids, attention_mask)
        batch = collate_prompts(
            vocab, [plain_text_prompt(r, bos_id=vocab.bos_id, eos_id=vocab.eos_id) for r in rows]
        )
        options = options_from_generation_config(config, input_ids.shape[1])
        if options.stop and not isinstance(vocab, CpmBeeTokenizerBase):
            raise ValueError("generate: stop_strings need the tokenizer: generate(..., tokenizer=tokenizer)")
        # transformers' contract: at most max_new_tokens ids (the original's beam search may add a last </s>)
        generated = [t[: options.max_new_tokens] for t in generate_tokens(self, vocab, batch, options)]
        pad = _setting(config, "pad_token_id", self.config.pad_token_id)
        width = max(len(t) for t in generated)
        out = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for b, tokens in enumerate(generated):
            out[b, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        sequences = torch.cat([input_ids, out], dim=1)
        if _setting(config, "return_dict_in_generate", False):
            return GenerateDecoderOnlyOutput(sequences=cast(torch.LongTensor, sequences))
        return sequences

    def _rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
        """Each row's ids without its left padding (``attention_mask``, else leading ``<pad>``)."""
        ids = input_ids.tolist()
        if attention_mask is not None:
            keep = attention_mask.bool().tolist()
            return [[i for i, k in zip(row, mask) if k] for row, mask in zip(ids, keep)]
        pad = self.config.pad_token_id
        return [row[next((j for j, i in enumerate(row) if i != pad), len(row)) :] for row in ids]


def register_auto_classes() -> None:
    """Make ``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM`` and ``AutoTokenizer`` read ``cpmbee``
    directories (done when this module is imported)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .model import CpmBeeModel

    try:
        AutoConfig.register(CpmBeeConfig.model_type, CpmBeeConfig)
        AutoModel.register(CpmBeeConfig, CpmBeeModel)
        AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM)
        AutoTokenizer.register(CpmBeeConfig, slow_tokenizer_class=CpmBeeTokenizer)
    except ValueError:  # already registered (module reloaded)
        pass


register_auto_classes()
