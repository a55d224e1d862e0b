"""The option vocabulary of the commands, declared once (docs/cli.md lists it).

* ``ModelArgs`` — which model to load and how: ``--model --device --dtype --quantize --memory-limit
  --offload-folder --compile --attn-implementation``. A dataclass whose attribute docstrings are the help
  text (litgpt's argument dataclasses); ``model_options`` turns it into click options.
* ``generation_options(...)`` — click options derived from ``cpmbee.generation_options.GenerationOptions``
  (names, types, defaults and the field descriptions as help), never copied by hand.
* ``DTYPE`` — the ``--dtype`` type: canonical ``float32``/``bfloat16``/``float16``, aliases accepted.

Importing this module costs no torch: the command line parses (and ``--help`` prints) without loading it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, NewType, TypeVar

import click

from ..dtypes import ALIASES_HELP, DTYPE_NAMES, canonical_dtype
from ..generation_options import GenerationOptions

if TYPE_CHECKING:
    from ..hf import CpmBeeForCausalLM, CpmBeeTokenizer

__all__ = [
    "DTYPE",
    "HOST",
    "Dtype",
    "ModelArgs",
    "dataclass_options",
    "generation_options",
    "model_options",
    "pop_generation_options",
]

F = TypeVar("F", bound=Callable[..., Any])

Dtype = NewType("Dtype", str)
"""A dtype name as the user gave it; ``DTYPE`` makes it canonical."""


class _DtypeType(click.ParamType):
    name = "dtype"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(DTYPE_NAMES) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return canonical_dtype(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


DTYPE = _DtypeType()

HOST = click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default)."
)
"""``--host`` of the commands that listen (serve, live)."""


@dataclass
class ModelArgs:
    """Which model to load, where and how."""

    model: str | None = None
    """Model directory or checkpoint file (default: the embedded demo model)."""
    device: str | None = None
    """cpu, cuda, cuda:1, … (default: CUDA when available)."""
    dtype: Dtype | None = None
    """Compute dtype; default: float32 on a CPU, the checkpoint's on a GPU."""
    quantize: Literal["int8", "nf4"] | None = None
    """Weight-only quantization with bitsandbytes."""
    memory_limit: str | None = None
    """Fit the model in this memory, e.g. '4GiB' or 'cuda:0=4GiB,cpu=8GiB'; the rest goes to disk."""
    offload_folder: str | None = None
    """Where --memory-limit puts layers that fit nowhere (default: a temporary directory)."""
    compile: bool = False
    """torch.compile the decode step: a slow first step, faster decoding after (long outputs, many inputs)."""
    attn_implementation: Literal["sdpa", "eager"] | None = None
    """Attention kernel: sdpa (default) or eager (the original's arithmetic, bit for bit)."""

    @classmethod
    def pop_from(cls, options: dict[str, Any]) -> ModelArgs:
        """Take this group's values out of a command's ``**options``."""
        return cls(**{f.name: options.pop(f.name) for f in dataclasses.fields(cls) if f.name in options})

    def check(self) -> None:
        if self.quantize is not None and self.memory_limit is not None:
            raise ValueError(
                "--quantize and --memory-limit cannot be combined; pick one way to fit the model"
            )

    def load_kwargs(self) -> dict[str, Any]:
        """Keywords of ``cpmbee.api.load_model_and_tokenizer`` (after ``path``)."""
        self.check()
        kwargs: dict[str, Any] = {
            "device": self.device,
            "dtype": self.dtype,
            "quantize": self.quantize,
            "compile": self.compile,
            "attn_implementation": self.attn_implementation,
        }
        if self.memory_limit is not None:
            from ..offload import parse_memory_limit

            kwargs["max_memory"] = parse_memory_limit(self.memory_limit)
            kwargs["offload_folder"] = self.offload_folder
        return kwargs

    def load(self) -> tuple[CpmBeeForCausalLM, CpmBeeTokenizer]:
        """``(model, tokenizer)``; a bad path or setting raises ``click.ClickException`` naming it."""
        from ..api import load_model_and_tokenizer

        try:
            return load_model_and_tokenizer(self.model, **self.load_kwargs())
        except (FileNotFoundError, ValueError) as err:
            raise click.ClickException(str(err)) from None


# ---------------------------------------------------------------------------------------------------- dataclasses
@cache
def _attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (``field: type = default`` then ``\"\"\"help\"\"\"``)."""
    body = ast.parse(inspect.getsource(cls)).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, following in zip(body.body, body.body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _click_option(name: str, kind: Any, default: Any, help_text: str) -> Callable[[F], F]:
    """A click option for one field of type ``kind`` (``X | None`` unwrapped, ``Literal`` → choices)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if default:
            return click.option(f"{_flag(name)}/--no-{_flag(name)[2:]}", default=True, help=help_text)
        return click.option(_flag(name), is_flag=True, help=help_text)
    if kind is Dtype:
        return click.option(
            _flag(name), type=DTYPE, default=default, help=f"{help_text.rstrip('.')} ({ALIASES_HELP})."
        )
    if typing.get_origin(kind) is list:
        return click.option(_flag(name), multiple=True, help=f"{help_text} Repeatable.")
    if typing.get_origin(kind) is Literal:
        choice = click.Choice([str(c) for c in typing.get_args(kind)])
        return click.option(_flag(name), type=choice, default=default, help=help_text)
    return click.option(
        _flag(name), type=kind, default=default, show_default=default is not None, help=help_text
    )


def dataclass_options(cls: type, *, exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Click options for the fields of dataclass ``cls``, help from their attribute docstrings."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    skipped = set(exclude)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skipped]

    def decorate(func: F) -> F:
        for f in reversed(fields):
            func = _click_option(f.name, hints[f.name], f.default, docs.get(f.name, ""))(func)
        return func

    return decorate


def model_options(func: F) -> F:
    """The ``ModelArgs`` options (collect them with ``ModelArgs.pop_from(options)``)."""
    return dataclass_options(ModelArgs)(func)


# ---------------------------------------------------------------------------------------------------- generation
def generation_options(
    only: Iterable[str] | None = None, defaults: Mapping[str, Any] | None = None
) -> Callable[[F], F]:
    """Click options for ``GenerationOptions`` fields (all, or ``only`` these), with the class's defaults
    unless ``defaults`` overrides them; the field descriptions are the help. Values are validated by
    ``GenerationOptions.parse`` (``pop_generation_options``), so the messages are the library's."""
    fields = GenerationOptions.model_fields
    names = list(fields) if only is None else list(only)
    overrides = dict(defaults or {})

    def default_of(name: str) -> Any:
        if name in overrides:
            return overrides[name]
        field = fields[name]
        return None if field.default_factory is not None else field.default

    def decorate(func: F) -> F:
        for name in reversed(names):
            field = fields[name]
            func = _click_option(name, field.annotation, default_of(name), field.description or "")(func)
        return func

    return decorate


def pop_generation_options(options: dict[str, Any]) -> dict[str, Any]:
    """Take the ``GenerationOptions`` values out of a command's ``**options`` (``None``: not given)."""
    out = {}
    for name in GenerationOptions.model_fields:
        if name in options:
            value = options.pop(name)
            if isinstance(value, tuple):
                value = list(value)
            if value is not None:
                out[name] = value
    return out
