"""The live view of a run directory (``docs/run-directory.md``), built incrementally from its files.

:class:`RunState` tails ``metrics/*.jsonl`` with :class:`~cpmbee.train.metrics.RecordTailer` and keeps what
the dashboard shows: columnar training series, eval points, checkpoints, sample generations, incidents,
events, the data mixture and the parameter-inspection history. ``refresh()`` reads only what was appended
since the last call, so attaching to a long run costs one pass over its files and each update after that
costs a few bytes. A job restarted from a checkpoint logs its steps again from there: the series are cut
back to the resumed step, so curves always show the trajectory the run actually continued from.

Nothing here imports a web framework; the server and the tests use it directly.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import json
import math
import os
import re
import socket
import time
from array import array
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import regex

from ..train.metrics import RecordTailer

__all__ = [
    "INSPECT_STATS",
    "TRAIN_FIELDS",
    "RunState",
    "Update",
    "downsample",
    "estimate_eta",
    "jsonable",
    "load_json_file",
    "log_offset_hours",
    "parse_time",
]

# Numeric fields of ``train`` records kept as series (``task_loss`` is kept per task beside them).
TRAIN_FIELDS = (
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_seen",
    "tokens_per_s",
    "step_time",
    "mfu",
    "mem_gb",
    "loss_scale",
    "fill",
)
# Columns that are cumulative or positional: downsampling keeps their last value instead of a mean.
_LAST_COLUMNS = frozenset({"step", "time", "tokens_seen"})
INSPECT_STATS = ("mean", "std", "max_abs", "norm", "grad_mean", "grad_std", "grad_max_abs", "grad_norm")
RUN_STATES = ("running", "finished", "stopped", "crashed")
_INCIDENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.json$")  # a file name a system allows


def parse_time(value: Any) -> float | None:
    """ISO-8601 text → POSIX seconds (naive times are taken as UTC); None when absent or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def load_json_file(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _find_key(tree: Any, key: str) -> Any:
    if isinstance(tree, Mapping):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def log_offset_hours(run_info: Mapping[str, Any] | None) -> float:
    """The run's log-day boundary (``utc_offset_hours`` of its JSONL sink) as recorded in ``run.json``.

    Looked up as ``run.json["utc_offset_hours"]``, then ``config.logging.utc_offset_hours``, then anywhere
    in ``config``; 0 (days in UTC) when the run does not say.
    """
    if not run_info:
        return 0.0
    config = run_info.get("config")
    logging = config.get("logging") if isinstance(config, Mapping) else None
    for candidate in (
        run_info.get("utc_offset_hours"),
        logging.get("utc_offset_hours") if isinstance(logging, Mapping) else None,
        _find_key(config, "utc_offset_hours"),
    ):
        if isinstance(candidate, (int, float)) and not isinstance(candidate, bool):
            return float(candidate)
    return 0.0


_NUMBER_TYPES = (int, float)
_NAN = math.nan
_CHUNK_BYTES = 4 << 20


def _number(value: Any) -> float | None:
    """A float for numbers (NaN/inf included), None for anything else (bools included)."""
    return float(value) if type(value) in _NUMBER_TYPES else None


def jsonable(value: Any) -> Any:
    """Non-finite floats → None, recursively, so browsers can ``JSON.parse`` the result."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int or kind is str or value is None or kind is bool:
        return value
    if kind is list:
        if all(type(v) is int or (type(v) is float and math.isfinite(v)) or v is None for v in value):
            return value  # the common case: a clean numeric column
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    return value


def _column(values: Sequence[Any]) -> np.ndarray:
    """A float64 view/copy of a column (``array('d')`` without copying; None → NaN)."""
    if isinstance(values, array) and values.typecode == "d":
        return np.frombuffer(values, dtype=np.float64) if len(values) else np.zeros(0)
    return np.array(values, dtype=np.float64) if len(values) else np.zeros(0)


def _to_list(values: np.ndarray) -> list[Any]:
    """Floats for JSON: non-finite → None; whole-number columns stay ints."""
    if values.dtype.kind in "iu":
        return values.tolist()
    return [v if math.isfinite(v) else None for v in values.tolist()]


def downsample(columns: Mapping[str, Sequence[Any]], max_points: int) -> dict[str, list[Any]]:
    """At most ``max_points`` rows, as lists ready for JSON (non-finite and missing values → None).

    Consecutive rows are bucketed; positional/cumulative columns (``step``, ``time``, ``tokens_seen``) keep
    the bucket's last value, the others its mean over finite values (None when a bucket has none). The last
    row always survives, so live points can be appended after it."""
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    out: dict[str, list[Any]] = {}
    if n <= max_points:
        for key, values in columns.items():
            if isinstance(values, array) and values.typecode == "q":
                out[key] = values.tolist()
            else:
                out[key] = _to_list(_column(values))
        return out
    bucket = math.ceil(n / max_points)
    rows = math.ceil(n / bucket)
    last = np.minimum(np.arange(1, rows + 1) * bucket - 1, n - 1)
    for key, values in columns.items():
        if isinstance(values, array) and values.typecode == "q":
            out[key] = np.frombuffer(values, dtype=np.int64)[last].tolist()
            continue
        col = _column(values)
        if key in _LAST_COLUMNS:
            out[key] = _to_list(col[last])
            continue
        flat = np.full(rows * bucket, np.nan)
        flat[:n] = col
        flat[~np.isfinite(flat)] = np.nan
        padded = flat.reshape(rows, bucket)
        counts = np.sum(~np.isnan(padded), axis=1)
        sums = np.nansum(padded, axis=1)
        out[key] = _to_list(np.divide(sums, counts, out=np.full(rows, np.nan), where=counts > 0))
    return out


def _present(value: Any) -> bool:
    return value is not None and value == value  # not None, not NaN


def estimate_eta(
    times: Sequence[float],
    steps: Sequence[int],
    tokens_seen: Sequence[float | None],
    plan: Mapping[str, Any] | None,
    *,
    window_s: float = 600.0,
) -> dict[str, Any]:
    """Progress against the plan and the time left at the recent rate.

    The plan is ``run.json["plan"]``: ``total_tokens`` when set, else ``total_steps``. The rate is measured
    on wall-clock time over the last ``window_s`` seconds of records (so evaluation and checkpoint time
    count). Returns ``{"unit", "done", "total", "progress" (0..1), "rate" (unit/s), "eta_s"}``; fields are
    None when they cannot be known (no plan, fewer than two points).
    """
    out: dict[str, Any] = {
        "unit": None,
        "done": None,
        "total": None,
        "progress": None,
        "rate": None,
        "eta_s": None,
    }
    plan = plan or {}
    if not len(steps):
        return out
    total_tokens, total_steps = plan.get("total_tokens"), plan.get("total_steps")
    series: Sequence[float | None]
    if total_tokens and len(tokens_seen) and _present(tokens_seen[-1]):
        unit, series, total = "tokens", tokens_seen, float(total_tokens)
    elif total_steps:
        unit, series, total = "steps", steps, float(total_steps)
    else:
        return out
    done = float(series[-1] or 0.0)  # present: checked above for tokens, steps are ints
    out.update(unit=unit, done=done, total=total, progress=min(done / total, 1.0) if total > 0 else None)
    start = len(times) - 1
    while start > 0 and times[start - 1] >= times[-1] - window_s and _present(series[start - 1]):
        start -= 1
    if start < len(times) - 1:
        elapsed = times[-1] - times[start]
        advanced = done - float(series[start] or 0.0)  # present: the loop stops before a gap
        if elapsed > 0 and advanced > 0:
            rate = advanced / elapsed
            out["rate"] = rate
            out["eta_s"] = max(total - done, 0.0) / rate
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@dataclass
class Update:
    """What one ``refresh()`` found: new records (each with its ``seq``) and whether status/run changed."""

    records: list[dict[str, Any]] = field(default_factory=list)
    status_changed: bool = False
    run_changed: bool = False

    def __bool__(self) -> bool:
        return bool(self.records) or self.status_changed or self.run_changed


class RunState:
    """Incrementally built view of one run directory.

    Args:
        run_dir: the run directory (it may still be empty; files are picked up as they appear).
        stale_after_s: a ``running`` status not updated for this long is shown as ``stale``.
        history: how many recent records are kept for clients that reconnect (``records_after``).
    """

    def __init__(
        self, run_dir: str | os.PathLike, *, stale_after_s: float = 60.0, history: int = 5000
    ) -> None:
        self.run_dir = Path(run_dir)
        self.stale_after_s = stale_after_s
        self._tailer = RecordTailer(self.run_dir / "metrics")
        self._recent: deque[dict[str, Any]] = deque(maxlen=history)
        self.seq = 0
        self.run_info: dict[str, Any] = {}
        self.raw_status: dict[str, Any] | None = None
        self._run_mtime: float | None = None
        self._status_key: tuple[Any, ...] | None = None
        # training series: typed arrays (8 bytes a value; NaN where a record had no number)
        self.train: dict[str, array] = {
            "step": array("q"),
            "time": array("d"),
            **{k: array("d") for k in TRAIN_FIELDS},
        }
        self.task_loss: dict[str, array] = {}
        self.nonfinite_steps: list[int] = []
        self.eval: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.incidents: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.mixtures: list[dict[str, Any]] = []
        self.data: dict[str, Any] | None = None
        self.rewinds: list[dict[str, Any]] = []
        # parameter inspection: aligned per-step columns for every group and statistic
        self.inspect_steps: array = array("q")
        self.inspect_time: array = array("d")
        self.inspect: dict[str, dict[str, array]] = {}
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------------ reading
    def refresh(self, *, collect: bool = True) -> Update:
        """Read what was appended or changed since the last call.

        The files are read in chunks of about 4 MiB, so attaching to a long run never holds more than one
        chunk's records at a time. ``collect=False`` (attaching) neither returns the records nor keeps them
        for ``records_after``: a client that was not there gets a snapshot instead.
        """
        update = Update()
        update.run_changed = self._read_run()
        update.status_changed = self._read_status()
        while True:
            before = dict(self._tailer.offsets)
            records = self._tailer.poll(max_bytes=_CHUNK_BYTES)
            for record in records:
                self.seq += 1
                record["seq"] = self.seq
                self._ingest(record)
            if collect:
                self._recent.extend(records)
                update.records.extend(records)
            if not records and self._tailer.offsets == before:
                break
        return update

    def _read_run(self) -> bool:
        path = self.run_dir / "run.json"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return False
        if mtime == self._run_mtime:
            return False
        info = load_json_file(path)
        if info is None:  # being rewritten: try again next time
            return False
        self._run_mtime = mtime
        self.run_info = info
        return True

    def _read_status(self) -> bool:
        status = load_json_file(self.run_dir / "status.json")
        if status is None and (self.run_dir / "status.json").exists():
            return False  # unreadable for a moment; keep the last one
        self.raw_status = status
        shown = self.status()
        key = (json.dumps(status, sort_keys=True, default=str), shown["state"])
        changed = key != self._status_key
        self._status_key = key
        return changed

    def records_after(self, seq: int) -> list[dict[str, Any]] | None:
        """Records with ``seq`` greater than the given one, or None when some are no longer kept."""
        if seq >= self.seq:
            return []
        if not self._recent or self._recent[0]["seq"] > seq + 1:
            return None
        return [r for r in self._recent if r["seq"] > seq]

    # ------------------------------------------------------------------------------------ ingest
    def _ingest(self, record: dict[str, Any]) -> None:
        kind = str(record.get("type", "?"))
        self.counts[kind] = self.counts.get(kind, 0) + 1
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(record)

    def _on_train(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        steps = self.train["step"]
        if steps and step <= steps[-1]:
            self._rewind(step, record)
        n = len(steps)
        steps.append(step)
        train = self.train
        when = parse_time(record.get("time"))
        train["time"].append(_NAN if when is None else when)
        for key in TRAIN_FIELDS:
            value = record.get(key)
            train[key].append(value if type(value) in _NUMBER_TYPES else _NAN)
        given = record.get("task_loss")
        task_loss: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
        for task in task_loss:
            if task not in self.task_loss:
                self.task_loss[str(task)] = array("d", [_NAN]) * n
        for task, column in self.task_loss.items():
            value = task_loss.get(task)
            column.append(value if type(value) in _NUMBER_TYPES else _NAN)
        loss = _number(record.get("loss"))
        if loss is not None and not math.isfinite(loss):
            self.nonfinite_steps.append(step)

    def _rewind(self, step: int, record: Mapping[str, Any]) -> None:
        """The job went back to ``step`` (resumed from a checkpoint): drop points at or after it."""
        cut = bisect.bisect_left(self.train["step"], step)
        self.rewinds.append(
            {"from_step": self.train["step"][-1], "to_step": step, "time": record.get("time")}
        )
        for column in (*self.train.values(), *self.task_loss.values()):
            del column[cut:]
        self.nonfinite_steps = [s for s in self.nonfinite_steps if s < step]
        self.eval = [e for e in self.eval if e["step"] < step]
        self._cut_inspect(step)

    def _cut_inspect(self, step: int) -> None:
        """Drop the parameter statistics at or after ``step``."""
        cut = bisect.bisect_left(self.inspect_steps, step)
        del self.inspect_steps[cut:]
        del self.inspect_time[cut:]
        for stats in self.inspect.values():
            for column in stats.values():
                del column[cut:]

    def _on_eval(self, record: dict[str, Any]) -> None:
        if isinstance(record.get("step"), int):
            if self.eval and self.eval[-1]["step"] >= record["step"]:  # re-evaluated after a resume
                self.eval = [e for e in self.eval if e["step"] < record["step"]]
            self.eval.append({k: v for k, v in record.items() if k not in ("type", "seq")})

    def _on_checkpoint(self, record: dict[str, Any]) -> None:
        entry = {k: record.get(k) for k in ("step", "time", "path", "tokens_seen")}
        self.checkpoints = [c for c in self.checkpoints if c["path"] != entry["path"]]
        self.checkpoints.append(entry)

    def _on_sample(self, record: dict[str, Any]) -> None:
        samples = record.get("samples") if isinstance(record.get("samples"), list) else []
        entry = {
            "step": record.get("step"),
            "time": record.get("time"),
            "checkpoint": record.get("checkpoint"),
            "samples": samples,
        }
        key = entry["checkpoint"] or entry["step"]
        self.samples = [s for s in self.samples if (s["checkpoint"] or s["step"]) != key]
        self.samples.append(entry)

    def _on_incident(self, record: dict[str, Any]) -> None:
        self.incidents.append({k: v for k, v in record.items() if k not in ("type", "seq")})

    def _on_event(self, record: dict[str, Any]) -> None:
        self.events.append({k: v for k, v in record.items() if k not in ("type", "seq")})

    def _on_mixture(self, record: dict[str, Any]) -> None:
        self.mixtures.append({k: v for k, v in record.items() if k not in ("type", "seq")})

    def _on_data(self, record: dict[str, Any]) -> None:
        self.data = {k: v for k, v in record.items() if k not in ("type", "seq")}

    def _on_inspect(self, record: dict[str, Any]) -> None:
        step, params = record.get("step"), record.get("params")
        if not isinstance(step, int) or not isinstance(params, Mapping):
            return
        if self.inspect_steps and step <= self.inspect_steps[-1]:
            self._cut_inspect(step)
        n = len(self.inspect_steps)
        self.inspect_steps.append(step)
        when = parse_time(record.get("time"))
        self.inspect_time.append(_NAN if when is None else when)
        for group, values in params.items():
            if not isinstance(values, Mapping):
                continue
            stats = self.inspect.setdefault(str(group), {})
            for stat, value in values.items():
                if stat not in stats:
                    stats[str(stat)] = array("d", [_NAN]) * n
                stats[stat].append(value if type(value) in _NUMBER_TYPES else _NAN)
        for stats in self.inspect.values():  # groups/stats missing from this record
            for column in stats.values():
                if len(column) == n:
                    column.append(_NAN)

    # ------------------------------------------------------------------------------------ views
    def status(self, now: float | None = None) -> dict[str, Any]:
        """``status.json`` plus what the dashboard derives: ``state`` (the file's, or ``stale`` when a
        running job stopped updating, ``lost`` when its process on this host is gone, ``unknown`` with no
        file), ``age_s`` since its last update."""
        now = time.time() if now is None else now
        raw = dict(self.raw_status or {})
        state = (
            raw.get("state")
            if raw.get("state") in RUN_STATES
            else ("unknown" if not raw else str(raw.get("state")))
        )
        updated = parse_time(raw.get("updated"))
        age = None if updated is None else max(now - updated, 0.0)
        shown = state
        if state == "running":
            pid = raw.get("pid")
            if isinstance(pid, int) and raw.get("host") == socket.gethostname() and not _pid_alive(pid):
                shown = "lost"
            elif age is not None and age > self.stale_after_s:
                shown = "stale"
        return {**raw, "file_state": raw.get("state"), "state": shown, "age_s": age}

    def eta(self, tail: int = 5000) -> dict[str, Any]:
        """``estimate_eta`` over the last ``tail`` training points (the rate window is 10 minutes)."""
        t = self.train
        first = max(len(t["step"]) - tail, 0)
        times = t["time"][first:]
        rows = [i for i, v in enumerate(times) if v == v]
        steps, seen = t["step"][first:], t["tokens_seen"][first:]
        return estimate_eta(
            [times[i] for i in rows],
            [steps[i] for i in rows],
            [seen[i] for i in rows],
            self.run_info.get("plan"),
        )

    def train_columns(self, max_points: int | None = 2000) -> dict[str, Any]:
        columns: dict[str, Sequence[Any]] = {
            k: v for k, v in self.train.items() if k in ("step", "time") or not np.isnan(_column(v)).all()
        }
        columns.update({f"task_loss/{task}": v for task, v in self.task_loss.items()})
        sampled = downsample(columns, max_points) if max_points else {k: list(v) for k, v in columns.items()}
        tasks = {k.split("/", 1)[1]: sampled.pop(k) for k in list(sampled) if k.startswith("task_loss/")}
        return {**sampled, "task_loss": tasks, "points": len(self.train["step"])}

    def inspect_series(
        self,
        stat: str,
        pattern: str | None = None,
        *,
        limit: int = 16,
        max_points: int = 500,
        matched: list[str] | None = None,
    ) -> dict[str, Any]:
        """History of one statistic for the groups whose name matches ``pattern`` (see ``match_groups``; all
        when None), at most ``limit`` groups (the first ones in name order). Raises ValueError on a bad or
        too slow pattern. ``matched``: the names matched already (``match_groups`` run elsewhere)."""
        names = matched if matched is not None else match_groups(pattern, sorted(self.inspect))
        chosen = [g for g in names if stat in self.inspect[g]][:limit]
        columns: dict[str, Sequence[Any]] = {"step": self.inspect_steps}
        columns.update({g: self.inspect[g][stat] for g in chosen})
        sampled = downsample(columns, max_points)
        return {
            "stat": stat,
            "step": sampled.pop("step"),
            "groups": chosen,
            "matched": len(names),
            "series": sampled,
        }

    def latest_inspect(self) -> dict[str, Any] | None:
        if not self.inspect_steps:
            return None
        return {
            "step": self.inspect_steps[-1],
            "params": jsonable(
                {g: {s: col[-1] for s, col in stats.items()} for g, stats in self.inspect.items()}
            ),
        }

    def checkpoint_list(self) -> list[dict[str, Any]]:
        out = []
        for c in self.checkpoints:
            path = c.get("path")
            exists = bool(path) and (self.run_dir / str(path)).is_dir()
            out.append({**c, "exists": exists})
        return out

    def snapshot(self, max_points: int = 2000) -> dict[str, Any]:
        """Everything the page needs to draw itself; live records are appended to it afterwards."""
        tasks_eval: set[str] = set()
        for e in self.eval:
            if isinstance(e.get("task_loss"), Mapping):
                tasks_eval.update(e["task_loss"])
        return jsonable(
            {
                "run_dir": str(self.run_dir.resolve()),
                "server_time": time.time(),
                "seq": self.seq,
                "run": self.run_info,
                "status": self.status(),
                "eta": self.eta(),
                "train": self.train_columns(max_points),
                "nonfinite_steps": self.nonfinite_steps[-1000:],
                "eval": self.eval,
                "checkpoints": self.checkpoint_list(),
                "samples": self.samples,
                "incidents": self.incidents[-1000:],
                "events": self.events[-1000:],
                "rewinds": self.rewinds,
                "mixtures": self.mixtures[-100:],
                "data": self.data,
                "inspect": {
                    "points": len(self.inspect_steps),
                    "groups": sorted(self.inspect),
                    "stats": sorted({s for stats in self.inspect.values() for s in stats}, key=_stat_order),
                    "latest": self.latest_inspect(),
                },
                "counts": self.counts,
                "utc_offset_hours": log_offset_hours(self.run_info),
            }
        )

    def incident_detail(self, name: str) -> dict[str, Any]:
        """The JSON file ``incidents/<name>``. ValueError for a name that is not a plain ``*.json`` file
        name, FileNotFoundError when it does not exist."""
        name = name.removeprefix("incidents/")
        if not _INCIDENT_NAME.match(name):
            raise ValueError(f"incident: {name!r} is not the name of a file in incidents/")
        path = self.run_dir / "incidents" / name
        if not path.is_file():
            raise FileNotFoundError(f"incident file {name} not found in {self.run_dir / 'incidents'}")
        with open(path, encoding="utf-8") as f:
            from ..train.metrics import from_json_value

            return jsonable(from_json_value(json.load(f)))


MAX_PATTERN = 500  # characters of a user's group pattern


def match_groups(pattern: str | None, names: Sequence[str], *, timeout_s: float = 0.5) -> list[str]:
    """The ``names`` in which the regular expression ``pattern`` finds a match (all when None or empty).

    Patterns come from the dashboard's users, so they run on the ``regex`` engine with a time limit for
    them all (a catastrophically backtracking pattern is refused instead of hanging the server) and
    without holding the GIL (the dashboard runs this off its event loop). ValueError for an invalid,
    too long or too slow pattern."""
    if not pattern:
        return list(names)
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"groups: a pattern of at most {MAX_PATTERN} characters, got {len(pattern)}")
    try:
        compiled = regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as err:
        raise ValueError(f"groups: not a valid regular expression: {err}") from None
    deadline = time.monotonic() + timeout_s
    out = []
    for name in names:
        try:
            found = compiled.search(name, timeout=max(deadline - time.monotonic(), 0.0), concurrent=True)
        except TimeoutError:
            raise ValueError(
                f"groups: the pattern takes longer than {timeout_s:g} s to match; simplify it"
            ) from None
        if found:
            out.append(name)
    return out


def _stat_order(stat: str) -> tuple[int, str]:
    with contextlib.suppress(ValueError):
        return (INSPECT_STATS.index(stat), stat)
    return (len(INSPECT_STATS), stat)
