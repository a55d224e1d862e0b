"""Filling the ``<ans>`` slots of CPM-Bee inputs: beam search as the original, greedy, sampling, streaming.

How an answer is produced (the original's protocol, kept exactly): the prompt (answer slots cut out) is run
once; then, for answer slot ``k``, the model is fed ``<s>`` at position 0 in that slot's segment and every
generated token at the next position, until it emits ``</s>``; the next slot starts again from ``<s>``.
Generated tokens are fed as *context* tokens of the main sample. A token from an extra output column
(``vocab_size + j``: a special token such as ``<mask_0>`` or an unknown-character run seen in the prompt) is
fed as its family id with its sub index.

Each step, before choosing:

* ``<unk>`` is forbidden unless the row's prompt had an unknown-character run; extra columns that belong to
  other rows of the batch are forbidden (both by setting the logit to -10000, as the original);
* the repetition penalty (CTRL: a positive logit is divided by it, a negative one multiplied) hits every
  distinct id *fed* since generation started — ``<s>`` included, extra tokens as their family id — or only the
  last ``repetition_window`` of them.

``beam_size > 1`` (default 3) is the original's beam search: ``2·beam`` best continuations over all beams,
scores summed in log-space, a finished hypothesis scored ``sum / len(hypothesis)``, a sentence finished when
``beam`` hypotheses exist and the best running score divided by the step cannot beat the worst; at the step
limit every candidate is finished. ``beam_size == 1`` is greedy (argmax) or, with ``do_sample``, sampling
(temperature, top-k, top-p, seeded); only these stream.

``max_new_tokens`` counts the generated tokens of a row over all its answers (``</s>`` between answers
included), as the original's ``max_length``. An answer that is never reached is ``None`` in the output.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from .model import CpmBeeCache
from .prompt import PromptBatch, collate_prompts, encode_prompt, fill_answers

__all__ = [
    "GenerationOptions",
    "StreamEvent",
    "allowed_output_columns",
    "compile_decoding",
    "generate",
    "stream_generate",
]

FORBIDDEN = -10000.0  # the logit forbidden columns get (not -inf: the original's value, kept for exactness)


class GenerationOptions(BaseModel):
    """Options of ``generate``/``stream_generate``; unknown names and bad values raise ``ValueError``.

    Types are strict (``"3"`` is not a beam size, ``"yes"`` not a flag), floats finite, the seed an int64."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False
    )

    beam_size: int = Field(3, ge=1, le=64, description="beams; 1 = greedy or sampling")
    max_new_tokens: int = Field(
        100, ge=1, validation_alias=AliasChoices("max_new_tokens", "max_length"), description="per row"
    )
    min_new_tokens: int = Field(0, ge=0, description="tokens before </s> is allowed, per answer (beam 1)")
    repetition_penalty: float = Field(1.0, ge=1.0)
    repetition_window: int | None = Field(None, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="an int64")
    stop: list[str] = Field(
        default_factory=list, strict=False, description="stop strings ending an answer (beam 1)"
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


@dataclass
class StreamEvent:
    """One increment of a streamed generation.

    ``index`` is the row of the input list (0 for a single dict), ``answer`` the 1-based answer slot and
    ``path`` its keys below ``<ans>``; ``text`` is the new text of that slot. The last event of a row has
    ``done=True`` and the filled dict in ``result``.
    """

    index: int
    answer: int
    path: tuple[str, ...]
    text: str
    done: bool = False
    result: Any = None


# ---------------------------------------------------------------------------------------------------- shared
@dataclass
class _Prepared:
    """A collated batch on the model's device plus the per-row constants every decoder needs."""

    batch: PromptBatch
    inputs: dict[str, torch.Tensor]
    forbidden: torch.Tensor  # (B, V+E) bool: columns a row may never produce
    width: int  # V + E output columns
    ext_ids: list[int]
    ext_subs: list[int]


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the embedding's device, or its execution device when accelerate offloads it."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return embedding.weight.device


_COMPILED = "_cpmbee_compiled_decode"


def compile_decoding(model: torch.nn.Module, **compile_options: Any) -> torch.nn.Module:
    """Run this model's decode steps (one token per row) through ``torch.compile``; returns the model.

    The step is compiled once with dynamic shapes (rows, cache length), so beams leaving the batch and the
    growing cache do not recompile; the prompt's prefill stays eager. Compiling takes a while on first use
    (on a 2-core CPU 40–80 s, ~10–20 s with torch's on-disk cache warm) and then removes most of the per-step
    operator overhead: see BENCHMARKS.md. Results equal eager decoding up to float rounding (inductor fuses
    the element-wise operations). Not for models dispatched over devices with accelerate hooks.
    ``compile_options`` go to ``torch.compile`` (``mode``, ``backend``, …)."""
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        raise ValueError("compile_decoding: a model dispatched over several devices cannot be compiled")
    options = {"dynamic": True, **compile_options}
    setattr(model, _COMPILED, torch.compile(model.forward, **options))
    return model


def allowed_output_columns(inputs: Mapping[str, torch.Tensor], vocab_size: int, unk_id: int) -> torch.Tensor:
    """``(B, V + E)`` bool: the output columns each row may produce (the rule decoding applies every step and
    training's greedy exact-match check assumes).

    Every vocabulary id except ``<unk>``, which is allowed only when the row's given tokens contain unknown
    text; plus the ext columns whose ``(ext_table_ids[j], ext_table_sub[j])`` token is among the row's given
    tokens. Given tokens are the context tokens that are not padding: positions before ``length`` in
    right-padded training rows, ``num_segments > 0`` otherwise.
    """
    ids, subs = inputs["input_ids"], inputs["input_id_sub"]
    b, width = ids.shape
    if "length" in inputs:
        valid = torch.arange(width, device=ids.device)[None, :] < inputs["length"].to(ids.device)[:, None]
    else:
        valid = inputs["num_segments"] != 0
    given = inputs["context"].bool() & valid  # (B, L)
    ext_ids, ext_subs = inputs["ext_table_ids"], inputs["ext_table_sub"]
    present = (
        (ids[:, :, None] == ext_ids[None, None, :])
        & (subs[:, :, None] == ext_subs[None, None, :])
        & given[..., None]
    ).any(dim=1)  # (B, E)
    vocab = torch.ones(b, vocab_size, dtype=torch.bool, device=ids.device)
    vocab[:, unk_id] = ((ids == unk_id) & given).any(dim=1)
    return torch.cat([vocab, present], dim=1)


def _prepare(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Any], single: bool = True) -> _Prepared:
    prompts = []
    for i, row in enumerate(rows):
        try:
            prompts.append(encode_prompt(tokenizer, row))
        except ValueError as e:
            raise ValueError(str(e) if single else f"data[{i}]: {e}") from None
    batch = collate_prompts(tokenizer, prompts)
    device = _model_device(model)
    inputs = batch.model_inputs(device)
    forbidden = ~allowed_output_columns(inputs, tokenizer.vocab_size, tokenizer.unk_id)
    return _Prepared(
        batch=batch,
        inputs=inputs,
        forbidden=forbidden,
        width=forbidden.shape[1],
        ext_ids=batch.ext_table_ids.tolist(),
        ext_subs=batch.ext_table_sub.tolist(),
    )


def _prefill(model: torch.nn.Module, prep: _Prepared, extra_steps: int) -> CpmBeeCache:
    """Run the prompts once and return the cache (room for ``extra_steps`` more tokens)."""
    inputs = prep.inputs
    b, length = inputs["input_ids"].shape
    cache = CpmBeeCache(
        model.config.num_hidden_layers, b, length + extra_steps + 1, device=_model_device(model)
    )
    model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def _step(
    model: torch.nn.Module,
    cache: CpmBeeCache,
    prep: _Prepared,
    rows: torch.Tensor,
    tokens: list[int],
    subs: list[int],
    positions: list[int],
    segments: list[int],
) -> torch.Tensor:
    """Feed one token per cache row (``rows``: the prompt row each cache row belongs to); float logits (N, V+E)."""
    device = _model_device(model)
    n = len(tokens)

    def col(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device).view(n, 1)

    inputs = prep.inputs
    forward = getattr(model, _COMPILED, model)
    out = forward(
        input_ids=col(tokens),
        input_id_sub=col(subs),
        position=col(positions),
        context=torch.ones(n, 1, dtype=torch.bool, device=device),
        sample_ids=torch.zeros(n, 1, dtype=torch.int32, device=device),
        num_segments=inputs["num_segments"][rows, -1:],
        segment=col(segments),
        segment_rel_offset=inputs["segment_rel_offset"][rows, -1:],
        segment_rel=inputs["segment_rel"][rows],
        ext_table_ids=inputs["ext_table_ids"],
        ext_table_sub=inputs["ext_table_sub"],
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[:, -1].float()


def _history(
    histories: list[list[int]], opts: GenerationOptions, device: torch.device
) -> torch.Tensor | None:
    """The ids the repetition penalty hits, one row per sequence (``None`` without a penalty).

    Rows are left-padded with their own first id: a duplicate changes nothing in a set of seen ids."""
    if opts.repetition_penalty == 1.0:
        return None
    window = opts.repetition_window
    rows = [h[-window:] if window else h for h in histories]
    width = max(len(h) for h in rows)
    return torch.tensor([[h[0]] * (width - len(h)) + h for h in rows], device=device)


def _restrict(
    logits: torch.Tensor, forbidden: torch.Tensor, history: torch.Tensor | None, opts: GenerationOptions
) -> torch.Tensor:
    """Forbidden columns to -10000, then the repetition penalty over ``history`` (N, T) of fed ids."""
    logits = logits.masked_fill_(forbidden, FORBIDDEN)  # in place: the step's logits are ours
    if history is not None and history.shape[1]:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, history.long(), True)
        penalised = torch.where(
            logits < 0, logits * opts.repetition_penalty, logits / opts.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    return logits


def _to_fed(word: int, vocab: int, prep: _Prepared) -> tuple[int, int]:
    """An output column as the (id, sub) pair fed back to the model."""
    if word >= vocab:
        return prep.ext_ids[word - vocab], prep.ext_subs[word - vocab]
    return word, 0


def _decode_answers(
    tokenizer: Any, table: Mapping[int, str], tokens: Sequence[tuple[int, int]]
) -> dict[int, str]:
    """Group ``(column, answer)`` pairs by answer, drop one trailing ``</s>`` each, decode with the row table."""
    grouped: dict[int, list[int]] = {}
    for word, answer in tokens:
        grouped.setdefault(answer, []).append(word)
    texts = {}
    for answer, words in grouped.items():
        if words and words[-1] == tokenizer.eos_id:
            words = words[:-1]
        texts[answer] = tokenizer.decode(words, table)
    return texts


def _as_rows(data: Any) -> tuple[list[Any], bool]:
    if isinstance(data, Mapping):
        return [data], True
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("data is an empty list: nothing to generate")
        for i, item in enumerate(data):
            if not isinstance(item, Mapping):
                raise ValueError(f"data[{i}] must be a dict with an '<ans>' key, got {type(item).__name__}")
        return list(data), False
    raise ValueError(f"data must be a CPM-Bee dict or a list of them, got {type(data).__name__}")


# ---------------------------------------------------------------------------------------------------- beam search
class _Hypotheses:
    """The ``n`` best finished hypotheses of a sentence (the original's bookkeeping, order included)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[tuple[float, list[tuple[int, int]]]] = []
        self.worst = 1e9

    def add(self, tokens: list[tuple[int, int]], total: float) -> None:
        score = total / len(tokens)
        if len(self.items) < self.n or score > self.worst:
            self.items.append((score, tokens))
            if len(self.items) > self.n:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_total: float, step: int) -> bool:
        if len(self.items) < self.n:
            return False
        return self.worst >= (best_total / step if step else -float("inf"))

    def best(self) -> list[tuple[int, int]]:
        return max(self.items, key=lambda item: item[0])[1]


@dataclass
class _Beam:
    answer: int  # index into the row's predict_segments
    tokens: list[tuple[int, int]]  # (output column, answer number)
    feed: tuple[int, int, int, int]  # next (id, sub, position, segment)
    history: list[int] = field(default_factory=list)  # ids fed since generation start


def _top_candidates(total: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best (score, beam * width + column) over all beams of each row of ``total`` (N, beam, width).

    The same set as one ``topk`` over the flattened ``beam * width`` scores, found in two small passes: the
    ``k`` best of every beam, then the ``k`` best of those ``beam * k`` candidates (a single top-k over a
    quarter-million scores is the slowest operation of a CPU beam step otherwise)."""
    n, beam, width = total.shape
    scores, columns = torch.topk(total, k, dim=2)  # (N, beam, k)
    flat = columns + torch.arange(beam, device=total.device)[:, None] * width
    top_scores, picked = torch.topk(scores.view(n, beam * k), k, dim=1)  # (N, k)
    return top_scores, flat.view(n, beam * k).gather(1, picked)


def _beam_search(
    model: torch.nn.Module,
    tokenizer: Any,
    prep: _Prepared,
    opts: GenerationOptions,
    should_stop: Callable[[int], bool] | None,
) -> tuple[list[list[tuple[int, int]]], list[_Hypotheses]]:
    beam = opts.beam_size
    limit = opts.max_new_tokens + 1  # + 1 for the final </s>
    vocab, width = tokenizer.vocab_size, prep.width
    n_rows = len(prep.batch)
    predict = prep.batch.predict_segments
    device = _model_device(model)

    cache = _prefill(model, prep, limit + 1)
    hyps = [_Hypotheses(beam) for _ in range(n_rows)]
    first = [(tokenizer.bos_id, 0, 0, predict[s][0][0]) for s in range(n_rows)]
    beams = {s: [_Beam(0, [], first[s]) for _ in range(beam)] for s in range(n_rows)}
    scores = torch.tensor([0.0] + [-1e9] * (beam - 1), device=device).repeat(n_rows)
    active = list(range(n_rows))
    cache.reorder(torch.arange(n_rows, device=device).repeat_interleave(beam))

    for step in range(limit + 1):
        if should_stop is not None:
            kept = [i for i, s in enumerate(active) if not should_stop(s)]  # abandoned: keep finished hyps
            if len(kept) < len(active):
                active = [active[i] for i in kept]
                if not active:
                    break
                keep = torch.tensor([i * beam + j for i in kept for j in range(beam)], device=device)
                cache.reorder(keep)
                scores = scores[keep]
        rows = torch.tensor(active, device=device).repeat_interleave(beam)
        flat = [b for s in active for b in beams[s]]
        for b in flat:
            b.history.append(b.feed[0])
        logits = _step(
            model,
            cache,
            prep,
            rows,
            [b.feed[0] for b in flat],
            [b.feed[1] for b in flat],
            [b.feed[2] for b in flat],
            [b.feed[3] for b in flat],
        )
        history = _history([b.history for b in flat], opts, device)
        logits = _restrict(logits, prep.forbidden[rows], history, opts)
        total = F.log_softmax(logits, dim=-1).add_(scores[:, None])
        top_scores, top_words = _top_candidates(total.view(len(active), beam, width), 2 * beam)
        top_scores_l, top_words_l = top_scores.tolist(), top_words.tolist()  # the one host sync of a step

        keep_rows: list[int] = []
        keep_scores: list[float] = []
        still_active = []
        for i, s in enumerate(active):
            if hyps[s].is_done(top_scores_l[i][0], step):
                continue
            chosen: list[_Beam] = []
            for value, index in zip(top_scores_l[i], top_words_l[i]):
                beam_id, word = divmod(index, width)
                cur = beams[s][beam_id]
                answer_no = predict[s][cur.answer][1]
                tokens = [*cur.tokens, (word, answer_no)]
                is_eos = word == tokenizer.eos_id
                if (is_eos and cur.answer + 1 == len(predict[s])) or step == limit:
                    hyps[s].add(tokens, value)
                    continue
                if is_eos:
                    nxt = cur.answer + 1
                    new = _Beam(nxt, tokens, (tokenizer.bos_id, 0, 0, predict[s][nxt][0]), list(cur.history))
                else:
                    fed_id, fed_sub = _to_fed(word, vocab, prep)
                    new = _Beam(
                        cur.answer, tokens, (fed_id, fed_sub, cur.feed[2] + 1, cur.feed[3]), list(cur.history)
                    )
                chosen.append(new)
                keep_rows.append(i * beam + beam_id)
                keep_scores.append(value)
                if len(chosen) == beam:
                    break
            if step == limit:
                continue
            beams[s] = chosen
            still_active.append(s)
        active = still_active
        if not active:
            break
        cache.reorder(torch.tensor(keep_rows, device=device))
        scores = torch.tensor(keep_scores, dtype=torch.float32, device=device)

    return [h.best() if h.items else [] for h in hyps], hyps


# ---------------------------------------------------------------------------------------------------- greedy / sampling
def _choose(logits: torch.Tensor, opts: GenerationOptions, generator: torch.Generator | None) -> torch.Tensor:
    if not opts.do_sample:
        return logits.argmax(dim=-1)
    # Shifted so that the best logit is 0 and divided in float64: any finite temperature (1e-300 too)
    # leaves finite logits or -inf, never inf or nan.
    logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = (logits.double() / opts.temperature).float()
    if opts.top_k:
        kth = torch.topk(logits, min(opts.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= opts.top_p  # keeps the first token over p
        drop_sorted[:, 0] = False  # and the best one whatever p (a tiny p rounds to 0 in float32)
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        logits = logits.masked_fill(drop, -float("inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass
class _Row:
    answer: int = 0  # index into predict_segments
    feed: tuple[int, int, int, int] = (0, 0, 0, 0)
    history: list[int] = field(default_factory=list)
    text: str = ""  # the answer being written (decoding is per token, so it grows by appending)
    length: int = 0  # its tokens
    texts: dict[int, str] = field(default_factory=dict)  # finished answers
    emitted: int = 0  # characters of the current answer already streamed
    generated: int = 0


def _greedy_events(
    model: torch.nn.Module,
    tokenizer: Any,
    rows_data: list[Any],
    prep: _Prepared,
    opts: GenerationOptions,
    should_stop: Callable[[int], bool] | None,
) -> Iterator[StreamEvent]:
    vocab = tokenizer.vocab_size
    batch = prep.batch
    predict = batch.predict_segments
    device = _model_device(model)
    generator = None
    if opts.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(opts.seed if opts.seed is not None else int(torch.seed() % (2**63)))
    holdback = max((len(s) for s in opts.stop), default=1) - 1

    cache = _prefill(model, prep, opts.max_new_tokens + 1)
    state = [_Row(feed=(tokenizer.bos_id, 0, 0, predict[s][0][0])) for s in range(len(rows_data))]
    active = list(range(len(rows_data)))

    def finish(s: int) -> StreamEvent:
        texts = {predict[s][k][1]: t for k, t in state[s].texts.items()}
        result = fill_answers(rows_data[s], batch.answer_paths[s], texts)
        return StreamEvent(index=s, answer=0, path=(), text="", done=True, result=result)

    def close_answer(s: int, text: str) -> Iterator[StreamEvent]:
        row = state[s]
        number = predict[s][row.answer][1]
        if len(text) > row.emitted:
            yield StreamEvent(s, number, batch.answer_paths[s][number - 1], text[row.emitted :])
        row.texts[row.answer] = text
        row.text, row.length, row.emitted = "", 0, 0

    while active:
        if should_stop is not None:
            dropped = {s for s in active if should_stop(s)}
            if dropped:
                keep = [i for i, s in enumerate(active) if s not in dropped]
                for s in sorted(dropped):
                    yield finish(s)
                active = [s for s in active if s not in dropped]
                if not active:
                    break
                cache.reorder(torch.tensor(keep, device=device))
        rows = torch.tensor(active, device=device)
        for s in active:
            state[s].history.append(state[s].feed[0])
        feeds = [state[s].feed for s in active]
        logits = _step(model, cache, prep, rows, *[list(c) for c in zip(*feeds)])
        history = _history([state[s].history for s in active], opts, device)
        logits = _restrict(logits, prep.forbidden[rows], history, opts)
        if opts.min_new_tokens:
            young = torch.tensor([state[s].length < opts.min_new_tokens for s in active], device=device)
            logits[:, tokenizer.eos_id] = logits[:, tokenizer.eos_id].masked_fill(young, -float("inf"))
        words = _choose(logits, opts, generator).tolist()

        keep: list[int] = []
        still_active: list[int] = []
        for i, (s, word) in enumerate(zip(active, words)):
            row = state[s]
            row.generated += 1
            number = predict[s][row.answer][1]
            last_answer = row.answer + 1 == len(predict[s])
            ended = False
            if word == tokenizer.eos_id:
                yield from close_answer(s, row.text)
                ended = True
            else:
                row.text += tokenizer.decode([word], batch.ext_tables[s])
                row.length += 1
                text = row.text
                cut = min((text.find(x) for x in opts.stop if x in text), default=-1)
                if cut >= 0:
                    yield from close_answer(s, text[:cut])
                    ended = True
                else:
                    ready = len(text) - holdback
                    if ready > row.emitted:
                        yield StreamEvent(
                            s, number, batch.answer_paths[s][number - 1], text[row.emitted : ready]
                        )
                        row.emitted = ready
            if ended and not last_answer:
                row.answer += 1
                row.feed = (tokenizer.bos_id, 0, 0, predict[s][row.answer][0])
            elif not ended:
                fed_id, fed_sub = _to_fed(word, vocab, prep)
                row.feed = (fed_id, fed_sub, row.feed[2] + 1, row.feed[3])
            out_of_budget = row.generated >= opts.max_new_tokens
            if (ended and last_answer) or out_of_budget:
                if not ended:
                    yield from close_answer(s, row.text)
                yield finish(s)
                continue
            keep.append(i)
            still_active.append(s)
        if still_active and len(still_active) != len(active):
            cache.reorder(torch.tensor(keep, device=device))
        active = still_active


# ---------------------------------------------------------------------------------------------------- public API
def stream_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    options: Mapping[str, Any] | GenerationOptions | None = None,
    *,
    should_stop: Callable[[int], bool] | None = None,
    **kwargs: Any,
) -> Iterator[StreamEvent]:
    """Yield text increments per answer slot as they are generated (greedy or sampling: ``beam_size`` 1).

    The caller's ``data`` is not modified; each row ends with a ``done`` event holding its filled copy.
    """
    if options is None and "beam_size" not in kwargs:
        kwargs["beam_size"] = 1  # streaming is greedy unless told to sample
    opts = GenerationOptions.parse(options, **kwargs)
    if opts.beam_size != 1:
        raise ValueError("beam_size: streaming needs beam_size=1 (greedy or sampling)")
    rows, single = _as_rows(data)
    rows = [copy.deepcopy(r) for r in rows]
    prep = _prepare(model, tokenizer, rows, single)
    with torch.inference_mode():
        yield from _greedy_events(model, tokenizer, rows, prep, opts, should_stop)


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    options: Mapping[str, Any] | GenerationOptions | None = None,
    *,
    should_stop: Callable[[int], bool] | None = None,
    **kwargs: Any,
) -> Any:
    """Fill every ``<ans>`` slot of one CPM-Bee dict (returns a dict) or a list of them (returns a list).

    Options: see ``GenerationOptions`` (defaults: the original's beam search, 3 beams). ``data`` is not
    modified; answers never reached (the token budget ran out first) are ``None``.
    """
    opts = GenerationOptions.parse(options, **kwargs)
    rows, single = _as_rows(data)
    prep = _prepare(model, tokenizer, rows, single)
    if opts.beam_size == 1:
        results: list[Any] = [None] * len(rows)
        with torch.inference_mode():
            for event in _greedy_events(model, tokenizer, rows, prep, opts, should_stop):
                if event.done:
                    results[event.index] = event.result
    else:
        with torch.inference_mode():
            best, _ = _beam_search(model, tokenizer, prep, opts, should_stop)
        results = []
        for s, tokens in enumerate(best):
            texts = _decode_answers(tokenizer, prep.batch.ext_tables[s], tokens)
            results.append(fill_answers(rows[s], prep.batch.answer_paths[s], texts))
    return results[0] if single else results


def beam_search_hypotheses(
    model: torch.nn.Module, tokenizer: Any, data: Sequence[Any], **kwargs: Any
) -> list[list[tuple[float, list[tuple[int, int]]]]]:
    """The finished hypotheses of every row (score, ``(column, answer)`` tokens), in the original's order;
    for conformance checks and for inspecting beams."""
    opts = GenerationOptions.parse(**kwargs)
    prep = _prepare(model, tokenizer, list(data))
    with torch.inference_mode():
        _, hyps = _beam_search(model, tokenizer, prep, opts, None)
    return [h.items for h in hyps]
