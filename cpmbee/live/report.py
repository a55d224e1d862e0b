"""Daily training logs, in the spirit of the ones CPM-Live published every day.

One report per *log day* of a run: loss at the begin and end of the day (overall and per task), data
consumed that day and in total, the average gradient norm, throughput, progress against the planned token
(or step) budget, the day's checkpoints, generations on the fixed prompts ("Daily Test"), and incidents
(loss spikes, NaNs, restarts, crashes, pauses), followed by a ``## Comment`` section for a human that is
kept verbatim when the report is rebuilt.

A log day runs from 00:00 to 24:00 at ``utc_offset_hours`` (CPM-Live used +16: a day ended at 16:00
Beijing time). The offset is the run's own (``run.json``, the same one its JSONL sink names its daily files
with) unless one is given; days are always computed from each record's timestamp, so a different offset
gives correct (differently cut) days.

Reports are written to ``RUN_DIR/reports/daily-YYYY-MM-DD.md`` and ``.html`` (atomically).
"""

from __future__ import annotations

import datetime as dt
import html
import itertools
import json
import math
import os
import re
import statistics
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.metrics import decode_line
from .state import estimate_eta, load_json_file, log_offset_hours, parse_time

__all__ = [
    "COMMENT_HEADING",
    "DaySummary",
    "available_days",
    "read_comment",
    "render_html",
    "render_markdown",
    "report_paths",
    "summarize_day",
    "write_report",
]

COMMENT_HEADING = "## Comment"
COMMENT_PLACEHOLDER = (
    "<!-- Write the day's comment below. This section is kept when the report is regenerated. -->\n"
)
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_FILE_DAY = re.compile(r"^metrics-(\d{4}-\d{2}-\d{2})\.jsonl$")
_REPORT_DAY = re.compile(r"^daily-(\d{4}-\d{2}-\d{2})\.md$")
_EDGE = 10  # begin/end loss: mean over this many first/last steps of the day
_PAUSE_S = 600.0  # a gap between training records longer than this is reported


def check_day(day: str) -> dt.date:
    """Parse ``YYYY-MM-DD`` or raise a ValueError naming the field."""
    if not isinstance(day, str) or not _DAY.match(day):
        raise ValueError(f"day: expected YYYY-MM-DD, got {day!r}")
    try:
        return dt.date.fromisoformat(day)
    except ValueError as err:
        raise ValueError(f"day: {day!r} is not a date ({err})") from err


def day_bounds(day: str, utc_offset_hours: float) -> tuple[dt.datetime, dt.datetime]:
    """The UTC start and end of a log day."""
    date = check_day(day)
    start = dt.datetime(date.year, date.month, date.day, tzinfo=dt.timezone.utc) - dt.timedelta(
        hours=utc_offset_hours
    )
    return start, start + dt.timedelta(days=1)


def day_of(posix: float, utc_offset_hours: float) -> str:
    when = dt.datetime.fromtimestamp(posix, dt.timezone.utc) + dt.timedelta(hours=utc_offset_hours)
    return when.strftime("%Y-%m-%d")


def _read_file(path: Path) -> Iterator[dict[str, Any]]:
    """Complete records of one JSONL file (a torn last line is skipped, as by ``read_records``)."""
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError:
        return
    with f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                record = decode_line(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def _metric_files(run_dir: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((run_dir / "metrics").glob("metrics-*.jsonl")):
        match = _FILE_DAY.match(path.name)
        if match:
            out[match.group(1)] = path
    return out


def run_offset(run_dir: str | os.PathLike, utc_offset_hours: float | None = None) -> float:
    """The given offset, else the run's own (``run.json``)."""
    if utc_offset_hours is not None:
        if not -24 < utc_offset_hours < 24:
            raise ValueError(f"utc_offset_hours: must be between -24 and 24, got {utc_offset_hours}")
        return float(utc_offset_hours)
    return log_offset_hours(load_json_file(Path(run_dir) / "run.json"))


def available_days(run_dir: str | os.PathLike, utc_offset_hours: float | None = None) -> list[str]:
    """Log days that have records, oldest first. With the run's own offset these are the daily files'
    names; with another one every record's timestamp is read."""
    run_dir = Path(run_dir)
    own = log_offset_hours(load_json_file(run_dir / "run.json"))
    offset = run_offset(run_dir, utc_offset_hours)
    files = _metric_files(run_dir)
    if offset == own:
        return sorted(files)
    days = set()
    for path in files.values():
        for record in _read_file(path):
            when = parse_time(record.get("time"))
            if when is not None:
                days.add(day_of(when, offset))
    return sorted(days)


def _day_records(run_dir: Path, day: str, offset: float) -> list[dict[str, Any]]:
    """Records whose time falls in the log day: the day's file and its neighbours (which hold them when the
    file names were made with a different offset), filtered by timestamp."""
    date = check_day(day)
    files = _metric_files(run_dir)
    own = log_offset_hours(load_json_file(run_dir / "run.json"))
    out = []
    # the sink wrote each record into the file of its day at the run's own offset; with another offset a
    # day's records lie in that file and its neighbours
    for delta in (0,) if offset == own else (-1, 0, 1):
        name = (date + dt.timedelta(days=delta)).isoformat()
        if name not in files:
            continue
        for record in _read_file(files[name]):
            when = parse_time(record.get("time"))
            if when is not None and day_of(when, offset) == day:
                record["_t"] = when
                out.append(record)
    out.sort(key=lambda r: r["_t"])
    return out


# ---------------------------------------------------------------------------------------------- summary
@dataclass
class DaySummary:
    """What a daily report says, computed from one log day's records."""

    day: str
    utc_offset_hours: float
    start: dt.datetime
    end: dt.datetime
    run_name: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    steps_logged: int = 0
    first_step: int | None = None
    last_step: int | None = None
    last_time: float | None = None
    loss_begin: float | None = None
    loss_end: float | None = None
    begin_steps: tuple[int, int] | None = None
    end_steps: tuple[int, int] | None = None
    task_loss: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    tokens_day: int = 0
    tokens_total: int | None = None
    grad_norm_mean: float | None = None
    grad_norm_max: tuple[float, int] | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    mem_gb: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, Any] | None = None
    incidents: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_steps: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    rewinds: list[tuple[int, int, float]] = field(default_factory=list)
    pauses: list[tuple[float, float]] = field(default_factory=list)
    mixture: dict[str, Any] | None = None
    data: dict[str, Any] | None = None

    @property
    def empty(self) -> bool:
        return self.steps_logged == 0 and not (self.events or self.incidents or self.checkpoints)


def _finite(values: Iterable[Any]) -> list[float]:
    return [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]


def _mean(values: Iterable[Any]) -> float | None:
    finite = _finite(values)
    return statistics.fmean(finite) if finite else None


def summarize_day(
    run_dir: str | os.PathLike, day: str, *, utc_offset_hours: float | None = None, edge: int = _EDGE
) -> DaySummary:
    """Compute the report's numbers for ``day`` (``YYYY-MM-DD``) from the run directory."""
    run_dir = Path(run_dir)
    offset = run_offset(run_dir, utc_offset_hours)
    start, end = day_bounds(day, offset)
    run_info = load_json_file(run_dir / "run.json") or {}
    s = DaySummary(day=day, utc_offset_hours=offset, start=start, end=end)
    s.run_name = str(run_info.get("name") or run_dir.name)
    s.plan = dict(run_info.get("plan") or {})
    records = _day_records(run_dir, day, offset)

    train = [r for r in records if r.get("type") == "train" and isinstance(r.get("step"), int)]
    s.steps_logged = len(train)
    if train:
        s.first_step, s.last_step = train[0]["step"], train[-1]["step"]
        s.last_time = train[-1]["_t"]
        head, tail = train[:edge], train[-edge:]
        s.loss_begin, s.loss_end = _mean(r.get("loss") for r in head), _mean(r.get("loss") for r in tail)
        s.begin_steps = (head[0]["step"], head[-1]["step"])
        s.end_steps = (tail[0]["step"], tail[-1]["step"])
        tasks = sorted({t for r in train if isinstance(r.get("task_loss"), Mapping) for t in r["task_loss"]})
        for task in tasks:
            with_task = [
                r["task_loss"][task]
                for r in train
                if isinstance(r.get("task_loss"), Mapping) and task in r["task_loss"]
            ]
            s.task_loss[task] = (_mean(with_task[:edge]), _mean(with_task[-edge:]))
        # tokens: net progress over the day (a resume that rewinds the counter is accounted for)
        seen = [(r.get("tokens_seen"), r.get("tokens")) for r in train]
        first_seen, first_tokens = seen[0]
        if isinstance(first_seen, (int, float)) and isinstance(seen[-1][0], (int, float)):
            before = first_seen - (first_tokens if isinstance(first_tokens, (int, float)) else 0)
            s.tokens_total = int(seen[-1][0])
            s.tokens_day = int(seen[-1][0] - before)
        else:
            s.tokens_day = int(sum(_finite(r.get("tokens") for r in train)))
        finite_grads = [(g[0], r["step"]) for r in train if (g := _finite([r.get("grad_norm")]))]
        if finite_grads:
            s.grad_norm_mean = statistics.fmean(g for g, _ in finite_grads)
            s.grad_norm_max = max(finite_grads)
        s.tokens_per_s = _mean(r.get("tokens_per_s") for r in train)
        s.mfu = _mean(r.get("mfu") for r in train)
        mems = _finite(r.get("mem_gb") for r in train)
        s.mem_gb = max(mems) if mems else None
        for r in train:
            loss, grad = r.get("loss"), r.get("grad_norm")
            if any(isinstance(v, float) and not math.isfinite(v) for v in (loss, grad)):
                s.nonfinite_steps.append(r["step"])
        for prev, cur in itertools.pairwise(train):
            if cur["step"] <= prev["step"]:
                s.rewinds.append((prev["step"], cur["step"], cur["_t"]))
            if cur["_t"] - prev["_t"] > _PAUSE_S:
                s.pauses.append((prev["_t"], cur["_t"]))
        # progress against the plan; the rate is the day's own (tokens over its active time)
        times = [r["_t"] for r in train]
        s.progress = estimate_eta(
            times,
            [r["step"] for r in train],
            [r.get("tokens_seen") for r in train],
            s.plan,
            window_s=math.inf,
        )
    evals = [r for r in records if r.get("type") == "eval"]
    if evals:
        s.eval = {k: v for k, v in evals[-1].items() if k not in ("type", "_t", "time")}
    s.checkpoints = [_clean(r) for r in records if r.get("type") == "checkpoint"]
    samples = [r for r in records if r.get("type") == "sample"]
    if samples:
        s.samples = _clean(samples[-1])
    s.incidents = [_clean(r) for r in records if r.get("type") == "incident"]
    s.events = [_clean(r) for r in records if r.get("type") == "event"]
    mixtures = [r for r in records if r.get("type") == "mixture"]
    if mixtures:
        s.mixture = _clean(mixtures[-1])
    data = [r for r in records if r.get("type") == "data"]
    if data:
        s.data = _clean(data[-1])
    return s


def _clean(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("type",)}


# ---------------------------------------------------------------------------------------------- markdown
def _esc(text: Any) -> str:
    """Untrusted text (model output, messages) as inline Markdown: no HTML, no markup, one line."""
    out = html.escape(str(text), quote=False)
    out = re.sub(r"([\\`*_\[\]#|~])", r"\\\1", out)
    return " ".join(out.split("\n"))


def _code(text: Any) -> str:
    """Inline code (Markdown escapes its content itself): a backtick fence longer than any run inside."""
    text = " ".join(str(text).splitlines())
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else str(value)
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"


def human_count(n: float | None) -> str:
    """1234567 → ``1.23 M``."""
    if n is None:
        return "—"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def human_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = round(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d} d {h} h"
    if h:
        return f"{h} h {m} min"
    return f"{m} min {sec} s" if m else f"{sec} s"


def _utc(posix: float | None) -> str:
    if posix is None:
        return "—"
    return dt.datetime.fromtimestamp(posix, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _hhmm(posix: float | None) -> str:
    if posix is None:
        return "—"
    return dt.datetime.fromtimestamp(posix, dt.timezone.utc).strftime("%H:%M UTC")


def _offset_text(hours: float) -> str:
    sign = "+" if hours >= 0 else "-"
    h, m = divmod(round(abs(hours) * 60), 60)
    return f"UTC{sign}{h:02d}:{m:02d}"


def _answer(output: Any) -> str:
    """The generated part of a filled CPM-Bee dict (its ``<ans>``), else the whole output as JSON."""
    if isinstance(output, Mapping) and "<ans>" in output:
        output = output["<ans>"]
    if isinstance(output, str):
        return output
    return json.dumps(output, ensure_ascii=False)


def render_markdown(s: DaySummary, comment: str | None = None) -> str:
    """The report as Markdown; ``comment`` is the text kept under ``## Comment`` (a placeholder if None)."""
    date = dt.date.fromisoformat(s.day)
    lines: list[str] = [
        f"# Training log: {_esc(s.run_name)} ({date.strftime('%B')} {date.day}, {date.year})",
        "",
    ]
    lines += [
        f"- Log day: {s.day}, from {_utc(s.start.timestamp())} to {_utc(s.end.timestamp())} "
        f"(days end at midnight {_offset_text(s.utc_offset_hours)})",
        f"- Steps: {s.first_step} → {s.last_step} ({s.steps_logged:,} logged)"
        if s.steps_logged
        else "- Steps: none logged",
        f"- Generated: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `cpmbee report`",
        "",
        "## Loss",
        "",
    ]
    if s.loss_begin is None and s.loss_end is None and not s.task_loss:
        lines += ["No training steps this day.", ""]
    else:
        lines += [
            "| | Begin | End |",
            "|---|---|---|",
            f"| **overall** | {_num(s.loss_begin)} | {_num(s.loss_end)} |",
        ]
        lines += [f"| {_esc(task)} | {_num(b)} | {_num(e)} |" for task, (b, e) in s.task_loss.items()]
        lines += [
            "",
            f"Begin and end are the mean loss over the first (steps {s.begin_steps[0]}–{s.begin_steps[1]}) and last "
            f"(steps {s.end_steps[0]}–{s.end_steps[1]}) logged steps of the day."
            if s.begin_steps and s.end_steps
            else "",
            "",
        ]
        if s.eval:
            extra = ", ".join(
                f"{k} {_num(v)}"
                for k, v in s.eval.items()
                if k not in ("step", "loss", "task_loss", "seq") and isinstance(v, (int, float))
            )
            lines += [
                f"Last evaluation (step {s.eval.get('step')}): loss {_num(s.eval.get('loss'))}"
                + (f", {extra}" if extra else "")
                + ".",
                "",
            ]
    lines += ["", "## Completed Data", ""]
    lines += [f"- This day: {human_count(s.tokens_day)} tokens ({s.tokens_day:,})"]
    if s.tokens_total is not None:
        lines += [f"- In total: {human_count(s.tokens_total)} tokens ({s.tokens_total:,})"]
    skipped = (s.data or {}).get("skipped_too_long")
    if isinstance(skipped, Mapping) and skipped:
        counts = ", ".join(f"{_esc(k)} {v:,}" for k, v in sorted(skipped.items()))
        lines += [f"- Records longer than `max_length`, skipped so far: {counts}"]
    if s.mixture and isinstance(s.mixture.get("shares"), Mapping):
        shares = ", ".join(
            f"{_esc(k)} {100 * v:.1f} %"
            for k, v in s.mixture["shares"].items()
            if isinstance(v, (int, float))
        )
        lines += [f"- Data mixture set this day (step {s.mixture.get('step')}): {shares}"]
    lines += ["", "## Average Grad Norm", ""]
    if s.grad_norm_mean is None:
        lines += ["—", ""]
    else:
        peak, at = s.grad_norm_max or (None, None)
        lines += [f"{_num(s.grad_norm_mean)} (maximum {_num(peak)} at step {at})", ""]
    lines += ["## Throughput", ""]
    parts = [
        f"{human_count(s.tokens_per_s)} tokens/s on average"
        if s.tokens_per_s is not None
        else "no throughput logged"
    ]
    if s.mfu is not None:
        parts.append(f"MFU {100 * s.mfu:.1f} %")
    if s.mem_gb is not None:
        parts.append(f"peak memory {s.mem_gb:.2f} GB")
    lines += ["; ".join(parts) + ".", "", "## Progress", ""]
    p = s.progress
    if p.get("progress") is not None:
        total = human_count(p["total"]) + (" tokens" if p["unit"] == "tokens" else " steps")
        text = f"{100 * p['done'] / p['total']:.2f} % of the planned {total}"
        if p.get("eta_s") is not None and p["done"] < p["total"]:
            text += f"; at this day's rate the rest takes {human_duration(p['eta_s'])}"
            if s.last_time is not None:
                text += f" (done around {_utc(s.last_time + p['eta_s'])})"
        elif p["done"] >= p["total"]:
            text += " (plan complete)"
        lines += [text + ".", ""]
    else:
        lines += ["No token or step budget in `run.json` (plan).", ""]
    lines += ["## Checkpoints", ""]
    if s.checkpoints:
        lines += ["| Step | Time | Tokens seen | Path |", "|---|---|---|---|"]
        for c in s.checkpoints:
            lines += [
                f"| {c.get('step')} | {_hhmm(c.get('_t'))} | {human_count(c.get('tokens_seen'))} | {_code(c.get('path'))} |"
            ]
    else:
        lines += ["None this day."]
    lines += ["", "## Daily Test", ""]
    if s.samples and s.samples.get("samples"):
        where = s.samples.get("checkpoint") or f"step {s.samples.get('step')}"
        lines += [f"Generations on the fixed prompts at {_code(where)} (step {s.samples.get('step')}):", ""]
        for i, item in enumerate(s.samples["samples"], 1):
            prompt = item.get("prompt") if isinstance(item, Mapping) else item
            output = item.get("output") if isinstance(item, Mapping) else None
            lines += [f"{i}. Prompt {_code(json.dumps(prompt, ensure_ascii=False))}", ""]
            answer = _answer(output).splitlines() or [""]
            lines += ["    > " + _esc(line) for line in answer]
            lines += [""]
    else:
        lines += ["No generations on the fixed prompts this day.", ""]
    lines += ["## Incidents", ""]
    incident_lines = _incident_lines(s)
    lines += incident_lines or ["None."]
    lines += ["", COMMENT_HEADING, ""]
    body = COMMENT_PLACEHOLDER if comment is None else comment
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines) + "\n")
    return text + body


def _incident_lines(s: DaySummary) -> list[str]:
    out = []
    items: list[tuple[float, str]] = []
    for inc in s.incidents:
        text = f"**{_esc(inc.get('kind', 'incident'))}** at step {inc.get('step')}: {_esc(inc.get('message', ''))}"
        if inc.get("file"):  # "incidents/NAME" (or just NAME), relative to the run directory
            name = str(inc["file"]).removeprefix("incidents/")
            text += f" ([batch samples](../incidents/{urllib.parse.quote(name, safe='')}))"
        items.append((inc.get("_t") or 0.0, text))
    labels = {
        "start": "Training started",
        "finish": "Training finished",
        "resume": "Restart: resumed",
        "stop": "Stopped",
        "crash": "Crashed",
        "data_config": "Data config reloaded",
    }
    for ev in s.events:
        kind = str(ev.get("event"))
        label = labels.get(kind, f"Event {_esc(kind)}")
        text = f"**{label}** at step {ev.get('step')}"
        if ev.get("message"):
            text += f": {_esc(ev['message'])}"
        items.append((ev.get("_t") or 0.0, text))
    for prev, cur, when in s.rewinds:
        items.append(
            (
                when,
                f"**Rewind**: steps went back from {prev} to {cur} (the job resumed from an earlier checkpoint)",
            )
        )
    for a, b in s.pauses:
        items.append(
            (a, f"**Pause**: no training steps from {_hhmm(a)} to {_hhmm(b)} ({human_duration(b - a)})")
        )
    items.sort(key=lambda x: x[0])
    out = [f"- {_hhmm(t) if t else ''} {text}".replace("-  ", "- ") for t, text in items]
    if s.nonfinite_steps:
        steps = s.nonfinite_steps
        shown = ", ".join(map(str, steps[:10])) + (f", … ({len(steps)} in all)" if len(steps) > 10 else "")
        out.append(f"- **NaN/inf** loss or gradient norm at {len(steps)} step(s): {shown}")
    return out


# ---------------------------------------------------------------------------------------------- files
def report_paths(run_dir: str | os.PathLike, day: str) -> tuple[Path, Path]:
    check_day(day)
    base = Path(run_dir) / "reports" / f"daily-{day}"
    return base.with_suffix(".md"), base.with_suffix(".html")


def read_comment(path: str | os.PathLike) -> str | None:
    """The text after the ``## Comment`` heading of an existing report (verbatim), None without one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(rf"^{re.escape(COMMENT_HEADING)}[ \t]*\n", text, flags=re.MULTILINE)
    if match is None:
        return None
    rest = text[match.end() :]
    return rest[1:] if rest.startswith("\n") else rest


def reported_days(run_dir: str | os.PathLike) -> list[str]:
    folder = Path(run_dir) / "reports"
    return sorted(m.group(1) for p in folder.glob("daily-*.md") if (m := _REPORT_DAY.match(p.name)))


_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "Noto Sans CJK SC", sans-serif; max-width: 54rem;
  margin: 2rem auto; padding: 0 1rem; color: #1d2330; }}
h1 {{ font-size: 1.6rem; border-bottom: 1px solid #d7dbe3; padding-bottom: .4rem; }}
h2 {{ font-size: 1.2rem; margin-top: 1.8rem; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #d7dbe3; padding: .25rem .6rem; text-align: left; }}
code {{ background: #f2f4f8; padding: 0 .25rem; border-radius: 3px; font-size: 90%; word-break: break-all; }}
blockquote {{ margin: .3rem 0 .8rem; padding: .2rem .8rem; border-left: 3px solid #4c7be0; background: #f7f9fd; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def render_html(markdown_text: str, title: str) -> str:
    """The Markdown report as a standalone HTML page (needs the ``markdown`` package)."""
    try:
        import markdown
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("HTML reports need the `markdown` package: pip install 'cpmbee[live]'") from err
    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code", "sane_lists"])
    return _HTML_TEMPLATE.format(title=html.escape(title), body=body)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_report(
    run_dir: str | os.PathLike, day: str, *, utc_offset_hours: float | None = None
) -> tuple[DaySummary, str]:
    """The day's summary and its Markdown, with the comment of an existing report kept."""
    summary = summarize_day(run_dir, day, utc_offset_hours=utc_offset_hours)
    md_path, _ = report_paths(run_dir, day)
    return summary, render_markdown(summary, read_comment(md_path))


def write_report(
    run_dir: str | os.PathLike, day: str, *, utc_offset_hours: float | None = None, html_too: bool = True
) -> list[Path]:
    """(Re)write ``reports/daily-<day>.md`` (and ``.html``), keeping its ``## Comment`` section.

    Raises ValueError for a malformed day or one without any record.
    """
    summary, text = build_report(run_dir, day, utc_offset_hours=utc_offset_hours)
    if summary.empty and not summary.mixture and not summary.data:
        raise ValueError(
            f"day: no records of {Path(run_dir)} fall on {day} (log days at {_offset_text(summary.utc_offset_hours)})"
        )
    md_path, html_path = report_paths(run_dir, day)
    _write_atomic(md_path, text)
    written = [md_path]
    if html_too:
        _write_atomic(html_path, render_html(text, f"Training log {day}: {summary.run_name}"))
        written.append(html_path)
    return written


def days_to_report(
    run_dir: str | os.PathLike, days: Sequence[str] | None, utc_offset_hours: float | None
) -> list[str]:
    """Validated days; all days with records when ``days`` is None."""
    if days is None:
        return available_days(run_dir, utc_offset_hours)
    for day in days:
        check_day(day)
    return list(days)
