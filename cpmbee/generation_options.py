"""``GenerationOptions``: every option of CPM-Bee generation, validated, in one place.

The decoders (``cpmbee.generation``), the server's request schemas and the ``cpmbee generate`` command
line all read their options, defaults and limits from this class. It imports neither torch nor the model,
so the command line can build its options from it without loading them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

__all__ = ["GenerationOptions"]


class GenerationOptions(BaseModel):
    """Options of ``generate``/``stream_generate``; unknown names and bad values raise ``ValueError``.

    Types are strict (``"3"`` is not a beam size, ``"yes"`` not a flag), floats finite, the seed an int64."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False
    )

    beam_size: int = Field(
        3,
        ge=1,
        le=64,
        description="Beams: the original's beam search; 1 = greedy, or sampling with do_sample.",
    )
    max_new_tokens: int = Field(
        100,
        ge=1,
        validation_alias=AliasChoices("max_new_tokens", "max_length"),
        description="Most tokens generated per row, over all its answers (max_length: the original's name).",
    )
    min_new_tokens: int = Field(
        0, ge=0, description="Tokens before </s> is allowed, per answer (beam size 1)."
    )
    repetition_penalty: float = Field(
        1.0, ge=1.0, description="CTRL penalty on every id fed since generation started (1 = none)."
    )
    repetition_window: int | None = Field(None, ge=1, description="Penalise only the last N fed ids.")
    do_sample: bool = Field(False, description="Sample instead of taking the best token (beam size 1).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_k: int = Field(0, ge=0, description="Sample among the k best tokens only (0 = all).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: the smallest set above p.")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="Seed for sampling (reproducible output; an int64)."
    )
    stop: list[str] = Field(
        default_factory=list,
        strict=False,
        description="Stop strings, each ending an answer (beam size 1).",
    )

    @classmethod
    def parse(
        cls, options: Mapping[str, Any] | GenerationOptions | None = None, **kwargs: Any
    ) -> GenerationOptions:
        """Validate options given as a mapping, an instance and/or keywords (keywords win)."""
        if isinstance(options, GenerationOptions):
            merged: dict[str, Any] = options.model_dump()
        else:
            merged = dict(options or {})
        merged.update(kwargs)
        if "max_length" in merged and "max_new_tokens" in merged:
            raise ValueError("give either max_new_tokens or max_length (its alias), not both")
        try:
            opts = cls.model_validate(merged)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(f"invalid generation option(s): {problems}") from None
        if opts.beam_size > 1 and (opts.do_sample or opts.stop or opts.min_new_tokens):
            raise ValueError(
                "beam_size > 1 is the reference beam search; do_sample, stop and min_new_tokens need beam_size=1"
            )
        if any(not s for s in opts.stop):
            raise ValueError("stop: stop strings must be non-empty")
        return opts
