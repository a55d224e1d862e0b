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

from .generation_options import GenerationOptions
from .inputs import CpmBeeBatch, CpmBeeInputs
from .model import CpmBeeCache, CpmBeeForCausalLMBase
from .prompt import CpmBeeInput, PromptBatch, collate_prompts, encode_prompt, fill_answers
from .tokenizer import CpmBeeTokenizerBase, Vocabulary

__all__ = [
    "ConfigVocabulary",
    "GenerationOptions",
    "StreamEvent",
    "allowed_output_columns",
    "beam_search_hypotheses",
    "compile_decoding",
    "generate",
    "generate_tokens",
    "stream_generate",
]

FORBIDDEN = -10000.0  # the logit forbidden columns get (not -inf: the original's value, kept for exactness)


@dataclass
class StreamEvent:
    """One increment of a streamed generation.

    ``index`` is the row of the input list (0 for a single dict), ``answer`` the 1-based answer slot and
    ``path`` its keys below ``<ans>``; ``text`` is the new text of that slot. The last event of a row has
    ``done=True``, the filled dict in ``result`` and the generated output columns in ``tokens`` (answers in
    order, each closed by ``</s>`` unless the token budget cut it).
    """

    index: int
    answer: int
    path: tuple[str, ...]
    text: str
    done: bool = False
    result: Any = None
    tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ConfigVocabulary:
    """The vocabulary facts a model's config holds (its size and the special-token ids), standing in for the
    tokenizer when plain token ids are decoded to token ids (transformers' ``generate(input_ids)``): no text
    is decoded, so ``decode`` gives ``""`` and stop strings need the real tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    unk_id: int
    encoder: Mapping[str, int] = field(default_factory=dict)  # plain ids carry no ext families

    @classmethod
    def of(cls, model: CpmBeeForCausalLMBase) -> ConfigVocabulary:
        c = model.config
        return cls(c.vocab_size, c.bos_token_id, c.eos_token_id, c.unk_token_id)

    def decode(self, token_ids: Sequence[int], ext_table: Mapping[int, str] | None = None) -> str:
        return ""


# ---------------------------------------------------------------------------------------------------- shared
@dataclass
class _Prepared:
    """A collated batch on the model's device plus the per-row constants every decoder needs."""

    batch: PromptBatch
    inputs: CpmBeeBatch
    forbidden: torch.Tensor  # (B, V+E) bool: columns a row may never produce
    width: int  # V + E output columns
    ext_ids: list[int]
    ext_subs: list[int]


def _model_device(model: CpmBeeForCausalLMBase) -> torch.device:
    """Where inputs go: the embedding's device, or its execution device when accelerate offloads it."""
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return embedding.weight.device


_COMPILED = "_cpmbee_compiled_decode"


def compile_decoding(model: CpmBeeForCausalLMBase, **compile_options: Any) -> CpmBeeForCausalLMBase:
    """Run this model's decode steps (one token per row) through ``torch.compile``; returns the model.

    The step is compiled once with dynamic shapes (rows, cache length), so beams leaving the batch and the
    growing cache do not recompile; the prompt's prefill stays eager. Compiling takes a while on first use
    (on a 2-core CPU 40–80 s, ~10–20 s with torch's on-disk cache warm) and then removes most of the per-step
    operator overhead: see BENCHMARKS.md. Results equal eager decoding up to float rounding (inductor fuses
    the element-wise operations). Not for models dispatched over devices with accelerate hooks.
    ``compile_options`` go to ``torch.compile`` (``mode``, ``backend``, …)."""
    device_map: dict[str, Any] | None = getattr(model, "hf_device_map", None)
    if device_map and len(set(device_map.values())) > 1:
        raise ValueError("compile_decoding: a model dispatched over several devices cannot be compiled")
    options = {"dynamic": True, **compile_options}
    setattr(model, _COMPILED, torch.compile(model.forward, **options))
    return model


def allowed_output_columns(inputs: Mapping[str, Any], vocab_size: int, unk_id: int) -> torch.Tensor:
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


def _encode(tokenizer: CpmBeeTokenizerBase, rows: Sequence[CpmBeeInput], single: bool = True) -> PromptBatch:
    prompts = []
    for i, row in enumerate(rows):
        try:
            prompts.append(encode_prompt(tokenizer, row))
        except ValueError as e:
            raise ValueError(str(e) if single else f"data[{i}]: {e}") from None
    return collate_prompts(tokenizer, prompts)


def _prepare(model: CpmBeeForCausalLMBase, vocab: Vocabulary, batch: PromptBatch) -> _Prepared:
    inputs = batch.model_inputs(_model_device(model))
    forbidden = ~allowed_output_columns(inputs, vocab.vocab_size, vocab.unk_id)
    return _Prepared(
        batch=batch,
        inputs=inputs,
        forbidden=forbidden,
        width=forbidden.shape[1],
        ext_ids=batch.ext_table_ids.tolist(),
        ext_subs=batch.ext_table_sub.tolist(),
    )


def _prefill(model: CpmBeeForCausalLMBase, prep: _Prepared, extra_steps: int) -> CpmBeeCache:
    """Run the prompts once and return the cache (room for ``extra_steps`` more tokens)."""
    inputs = prep.inputs
    b, length = inputs["input_ids"].shape
    cache = CpmBeeCache(
        model.config.num_hidden_layers, b, length + extra_steps + 1, device=_model_device(model)
    )
    model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
    return cache


# A token to feed: (id, sub, position, segment). Generated tokens are context tokens of the main sample.
Feed = tuple[int, int, int, int]


def _step(
    model: CpmBeeForCausalLMBase, cache: CpmBeeCache, prep: _Prepared, rows: torch.Tensor, feeds: list[Feed]
) -> torch.Tensor:
    """Feed one token per cache row (``rows``: the prompt row each cache row belongs to); float logits (N, V+E)."""
    device = _model_device(model)
    n = len(feeds)
    columns = torch.tensor(feeds, dtype=torch.int32, device=device).view(n, 4, 1)  # (N, 4, 1)
    batch = prep.inputs
    step: CpmBeeInputs = {
        "input_id_sub": columns[:, 1],
        "position": columns[:, 2],
        "context": torch.ones(n, 1, dtype=torch.bool, device=device),
        "sample_ids": torch.zeros(n, 1, dtype=torch.int32, device=device),
        "num_segments": batch["num_segments"][rows, -1:],
        "segment": columns[:, 3],
        "segment_rel_offset": batch["segment_rel_offset"][rows, -1:],
        "segment_rel": batch["segment_rel"][rows],
        "ext_table_ids": batch["ext_table_ids"],
        "ext_table_sub": batch["ext_table_sub"],
    }
    forward = getattr(model, _COMPILED, model)
    out = forward(columns[:, 0], cache=cache, use_cache=True, **step)
    logits: torch.Tensor = out.logits[:, -1].float()
    return logits


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
    vocab: Vocabulary, table: Mapping[int, str], tokens: Sequence[tuple[int, int]]
) -> dict[int, str]:
    """Group ``(column, answer)`` pairs by answer, drop one trailing ``</s>`` each, decode with the row table."""
    grouped: dict[int, list[int]] = {}
    for word, answer in tokens:
        grouped.setdefault(answer, []).append(word)
    texts = {}
    for answer, words in grouped.items():
        if words and words[-1] == vocab.eos_id:
            words = words[:-1]
        texts[answer] = vocab.decode(words, table)
    return texts


def _as_rows(data: Any) -> tuple[list[CpmBeeInput], bool]:
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
    feed: Feed  # the next token to feed
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


class _BeamSearch:
    """The original's beam search over a prepared batch: ``run()`` returns every row's best tokens and its
    finished hypotheses."""

    def __init__(
        self,
        model: CpmBeeForCausalLMBase,
        vocab: Vocabulary,
        prep: _Prepared,
        opts: GenerationOptions,
        should_stop: Callable[[int], bool] | None,
    ) -> None:
        self.model, self.vocab, self.prep, self.opts, self.should_stop = model, vocab, prep, opts, should_stop
        self.beam = opts.beam_size
        self.limit = opts.max_new_tokens + 1  # + 1 for the final </s>
        self.predict = prep.batch.predict_segments
        self.device = _model_device(model)
        n_rows = len(prep.batch)
        self.hyps = [_Hypotheses(self.beam) for _ in range(n_rows)]
        self.beams = {
            s: [_Beam(0, [], (vocab.bos_id, 0, 0, self.predict[s][0][0])) for _ in range(self.beam)]
            for s in range(n_rows)
        }

    def run(self) -> tuple[list[list[tuple[int, int]]], list[_Hypotheses]]:
        beam, device, prep = self.beam, self.device, self.prep
        cache = _prefill(self.model, prep, self.limit + 1)
        n_rows = len(prep.batch)
        scores = torch.tensor([0.0] + [-1e9] * (beam - 1), device=device).repeat(n_rows)
        active = list(range(n_rows))
        cache.reorder(torch.arange(n_rows, device=device).repeat_interleave(beam))

        for step in range(self.limit + 1):
            if self.should_stop is not None:
                kept = [i for i, s in enumerate(active) if not self.should_stop(s)]  # keep finished hyps
                if len(kept) < len(active):
                    active = [active[i] for i in kept]
                    if not active:
                        break
                    keep = torch.tensor([i * beam + j for i in kept for j in range(beam)], device=device)
                    cache.reorder(keep)
                    scores = scores[keep]
            rows = torch.tensor(active, device=device).repeat_interleave(beam)
            flat = [b for s in active for b in self.beams[s]]
            for b in flat:
                b.history.append(b.feed[0])
            logits = _step(self.model, cache, prep, rows, [b.feed for b in flat])
            history = _history([b.history for b in flat], self.opts, device)
            logits = _restrict(logits, prep.forbidden[rows], history, self.opts)
            total = F.log_softmax(logits, dim=-1).add_(scores[:, None])
            top_scores, top_words = _top_candidates(total.view(len(active), beam, prep.width), 2 * beam)
            candidates = zip(top_scores.tolist(), top_words.tolist())  # the one host sync of a step

            keep_rows: list[int] = []
            keep_scores: list[float] = []
            still_active = []
            for i, (s, (row_scores, row_words)) in enumerate(zip(active, candidates)):
                if self.hyps[s].is_done(row_scores[0], step):
                    continue
                chosen = self._extend(s, step, row_scores, row_words)
                if step == self.limit:
                    continue
                keep_rows.extend(i * beam + beam_id for beam_id, _ in chosen)
                keep_scores.extend(value for _, value in chosen)
                still_active.append(s)
            active = still_active
            if not active:
                break
            cache.reorder(torch.tensor(keep_rows, device=device))
            scores = torch.tensor(keep_scores, dtype=torch.float32, device=device)

        return [h.best() if h.items else [] for h in self.hyps], self.hyps

    def _extend(
        self, s: int, step: int, row_scores: list[float], row_words: list[int]
    ) -> list[tuple[int, float]]:
        """Walk row ``s``'s ``2·beam`` best continuations: finished ones become hypotheses, the first ``beam``
        others its new beams. Returns ``(old beam, score)`` of each new beam."""
        eos, width, predict = self.vocab.eos_id, self.prep.width, self.predict[s]
        chosen: list[_Beam] = []
        kept: list[tuple[int, float]] = []
        for value, index in zip(row_scores, row_words):
            beam_id, word = divmod(index, width)
            cur = self.beams[s][beam_id]
            tokens = [*cur.tokens, (word, predict[cur.answer][1])]
            if (word == eos and cur.answer + 1 == len(predict)) or step == self.limit:
                self.hyps[s].add(tokens, value)
                continue
            if word == eos:
                feed: Feed = (self.vocab.bos_id, 0, 0, predict[cur.answer + 1][0])
                chosen.append(_Beam(cur.answer + 1, tokens, feed, list(cur.history)))
            else:
                fed_id, fed_sub = _to_fed(word, self.vocab.vocab_size, self.prep)
                feed = (fed_id, fed_sub, cur.feed[2] + 1, cur.feed[3])
                chosen.append(_Beam(cur.answer, tokens, feed, list(cur.history)))
            kept.append((beam_id, value))
            if len(chosen) == self.beam:
                break
        if step < self.limit:
            self.beams[s] = chosen
        return kept


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
    """The decoding state of one row: which answer it writes, what it feeds next, what it wrote."""

    feed: Feed
    answer: int = 0  # index into predict_segments
    history: list[int] = field(default_factory=list)
    text: str = ""  # the answer being written (decoding is per token, so it grows by appending)
    length: int = 0  # its tokens
    texts: dict[int, str] = field(default_factory=dict)  # finished answers
    emitted: int = 0  # characters of the current answer already streamed
    tokens: list[int] = field(default_factory=list)  # output columns generated so far (answers, </s>)


class _Greedy:
    """Greedy or sampled decoding of a prepared batch, one token per row per step; ``events()`` yields the
    text increments and each row's final event. Rows leave the batch as they finish."""

    def __init__(
        self,
        model: CpmBeeForCausalLMBase,
        vocab: Vocabulary,
        rows_data: Sequence[CpmBeeInput] | None,
        prep: _Prepared,
        opts: GenerationOptions,
        should_stop: Callable[[int], bool] | None,
    ) -> None:
        self.model, self.vocab, self.rows_data, self.prep = model, vocab, rows_data, prep
        self.opts, self.should_stop = opts, should_stop
        self.batch = prep.batch
        self.predict = self.batch.predict_segments
        self.device = _model_device(model)
        self.generator = None
        if opts.do_sample:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(opts.seed if opts.seed is not None else int(torch.seed() % (2**63)))
        self.holdback = max((len(s) for s in opts.stop), default=1) - 1
        self.state = [_Row(feed=self._first_feed(s, 0)) for s in range(len(self.batch))]

    def _first_feed(self, s: int, answer: int) -> Feed:
        return (self.vocab.bos_id, 0, 0, self.predict[s][answer][0])

    def events(self) -> Iterator[StreamEvent]:
        cache = _prefill(self.model, self.prep, self.opts.max_new_tokens + 1)
        active = list(range(len(self.batch)))
        while active:
            if self.should_stop is not None:
                dropped = [s for s in active if self.should_stop(s)]
                if dropped:
                    for s in dropped:
                        yield self._finish(s)
                    active = self._leave(cache, active, set(dropped))
                    if not active:
                        break
            words = self._next_words(cache, active)
            done: set[int] = set()
            for s, word in zip(active, words):
                yield from self._advance(s, word, done)
            if done:
                active = self._leave(cache, active, done)

    def _leave(self, cache: CpmBeeCache, active: list[int], leaving: set[int]) -> list[int]:
        """The rows still decoding; the cache keeps only theirs."""
        keep = [i for i, s in enumerate(active) if s not in leaving]
        if keep and len(keep) < len(active):
            cache.reorder(torch.tensor(keep, device=self.device))
        return [active[i] for i in keep]

    def _next_words(self, cache: CpmBeeCache, active: list[int]) -> list[int]:
        opts, state = self.opts, self.state
        rows = torch.tensor(active, device=self.device)
        for s in active:
            state[s].history.append(state[s].feed[0])
        logits = _step(self.model, cache, self.prep, rows, [state[s].feed for s in active])
        history = _history([state[s].history for s in active], opts, self.device)
        logits = _restrict(logits, self.prep.forbidden[rows], history, opts)
        if opts.min_new_tokens:
            eos = self.vocab.eos_id
            young = torch.tensor([state[s].length < opts.min_new_tokens for s in active], device=self.device)
            logits[:, eos] = logits[:, eos].masked_fill(young, -float("inf"))
        words: list[int] = _choose(logits, opts, self.generator).tolist()
        return words

    def _advance(self, s: int, word: int, done: set[int]) -> Iterator[StreamEvent]:
        """Take row ``s``'s new ``word``: stream its text, close an answer, move on or finish."""
        row, vocab = self.state[s], self.vocab
        row.tokens.append(word)
        last_answer = row.answer + 1 == len(self.predict[s])
        ended = False
        if word == vocab.eos_id:
            yield from self._close_answer(s, row.text)
            ended = True
        else:
            row.text += vocab.decode([word], self.batch.ext_tables[s])
            row.length += 1
            text = row.text
            cut = min((text.find(x) for x in self.opts.stop if x in text), default=-1)
            if cut >= 0:
                yield from self._close_answer(s, text[:cut])
                ended = True
            else:
                ready = len(text) - self.holdback
                if ready > row.emitted:
                    yield self._text_event(s, text[row.emitted : ready])
                    row.emitted = ready
        if ended and not last_answer:
            row.answer += 1
            row.feed = self._first_feed(s, row.answer)
        elif not ended:
            fed_id, fed_sub = _to_fed(word, vocab.vocab_size, self.prep)
            row.feed = (fed_id, fed_sub, row.feed[2] + 1, row.feed[3])
        if (ended and last_answer) or len(row.tokens) >= self.opts.max_new_tokens:
            if not ended:
                yield from self._close_answer(s, row.text)
            yield self._finish(s)
            done.add(s)

    def _text_event(self, s: int, text: str) -> StreamEvent:
        number = self.predict[s][self.state[s].answer][1]
        return StreamEvent(s, number, self.batch.answer_paths[s][number - 1], text)

    def _close_answer(self, s: int, text: str) -> Iterator[StreamEvent]:
        row = self.state[s]
        if len(text) > row.emitted:
            yield self._text_event(s, text[row.emitted :])
        row.texts[row.answer] = text
        row.text, row.length, row.emitted = "", 0, 0

    def _finish(self, s: int) -> StreamEvent:
        row = self.state[s]
        result = None
        if self.rows_data is not None:
            texts = {self.predict[s][k][1]: t for k, t in row.texts.items()}
            result = fill_answers(self.rows_data[s], self.batch.answer_paths[s], texts)
        return StreamEvent(index=s, answer=0, path=(), text="", done=True, result=result, tokens=row.tokens)


# ---------------------------------------------------------------------------------------------------- public API
def stream_generate(
    model: CpmBeeForCausalLMBase,
    tokenizer: CpmBeeTokenizerBase,
    data: CpmBeeInput | Sequence[CpmBeeInput],
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
    prep = _prepare(model, tokenizer, _encode(tokenizer, rows, single))
    with torch.inference_mode():
        yield from _Greedy(model, tokenizer, rows, prep, opts, should_stop).events()


def generate(
    model: CpmBeeForCausalLMBase,
    tokenizer: CpmBeeTokenizerBase,
    data: CpmBeeInput | Sequence[CpmBeeInput],
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
    prep = _prepare(model, tokenizer, _encode(tokenizer, rows, single))
    if opts.beam_size == 1:
        results: list[Any] = [None] * len(rows)
        with torch.inference_mode():
            for event in _Greedy(model, tokenizer, rows, prep, opts, should_stop).events():
                if event.done:
                    results[event.index] = event.result
    else:
        with torch.inference_mode():
            best, _ = _BeamSearch(model, tokenizer, prep, opts, should_stop).run()
        results = []
        for s, tokens in enumerate(best):
            texts = _decode_answers(tokenizer, prep.batch.ext_tables[s], tokens)
            results.append(fill_answers(rows[s], prep.batch.answer_paths[s], texts))
    return results[0] if single else results


def generate_tokens(
    model: CpmBeeForCausalLMBase,
    vocab: Vocabulary,
    batch: PromptBatch,
    options: Mapping[str, Any] | GenerationOptions | None = None,
    **kwargs: Any,
) -> list[list[int]]:
    """The output columns generated for each row of a collated ``batch``: its answers in order, each closed
    by ``</s>`` unless the token budget cut it. ``vocab`` is the tokenizer, or ``ConfigVocabulary.of(model)``
    when only ids are wanted (stop strings then need the tokenizer). Options as ``generate``."""
    opts = GenerationOptions.parse(options, **kwargs)
    prep = _prepare(model, vocab, batch)
    with torch.inference_mode():
        if opts.beam_size == 1:
            out: list[list[int]] = [[] for _ in range(len(batch))]
            for event in _Greedy(model, vocab, None, prep, opts, None).events():
                if event.done:
                    out[event.index] = event.tokens
            return out
        best, _ = _BeamSearch(model, vocab, prep, opts, None).run()
    return [[word for word, _ in tokens] for tokens in best]


def beam_search_hypotheses(
    model: CpmBeeForCausalLMBase, tokenizer: CpmBeeTokenizerBase, data: Sequence[CpmBeeInput], **kwargs: Any
) -> list[list[tuple[float, list[tuple[int, int]]]]]:
    """The finished hypotheses of every row (score, ``(column, answer)`` tokens), in the original's order;
    for conformance checks and for inspecting beams."""
    opts = GenerationOptions.parse(**kwargs)
    prep = _prepare(model, tokenizer, _encode(tokenizer, list(data)))
    with torch.inference_mode():
        _, hyps = _BeamSearch(model, tokenizer, prep, opts, None).run()
    return [h.items for h in hyps]
