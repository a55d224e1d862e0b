"""Metrics records and their sinks.

A record is a flat-ish JSON object: ``{"type": "train", "step": 120, "time": "...", "loss": 2.31, ...}``.
Types used by the trainers: ``train`` (every step), ``eval``, ``inspect`` (parameter statistics),
``checkpoint``, ``sample`` (generations at a checkpoint), ``incident`` (loss spikes, NaNs), ``event``
(start, resume, stop) and ``config``.

The JSONL sink is the source of truth: one file per day (``metrics-YYYY-MM-DD.jsonl``, the day taken at
``utc_offset_hours``), each line flushed as it is written, so a dashboard can tail the files while the job
runs and a daily report can be rebuilt from them later. Non-finite floats are written as the strings
``"NaN"``, ``"Infinity"``, ``"-Infinity"`` so every line stays valid JSON for browsers too.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "ConsoleSink",
    "JsonlSink",
    "MetricsLogger",
    "MetricsSink",
    "RecordTailer",
    "TensorBoardSink",
    "decode_line",
    "from_json_value",
    "read_records",
]

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _to_json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _to_json_value(value.item())
    return value


def decode_line(line: str | bytes) -> Any:
    """One JSONL line; the non-finite encoding is undone only where the line can contain it (fast path)."""
    record = json.loads(line)
    if isinstance(line, str):
        marked = '"NaN"' in line or 'Infinity"' in line
    else:
        marked = b'"NaN"' in line or b'Infinity"' in line
    if marked:
        record = from_json_value(record)
    return record


def from_json_value(value: Any) -> Any:
    """Undo the non-finite encoding (``"NaN"`` → ``nan``) recursively."""
    if isinstance(value, str):
        return _NONFINITE.get(value, value)
    if isinstance(value, Mapping):
        return {k: from_json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_value(v) for v in value]
    return value


class MetricsSink(Protocol):
    def log(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Append records to ``<directory>/metrics-<day>.jsonl``, one JSON object per line."""

    def __init__(
        self, directory: str | os.PathLike, *, utc_offset_hours: float = 0.0, prefix: str = "metrics"
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.offset = dt.timedelta(hours=utc_offset_hours)
        self.prefix = prefix
        self._day: str | None = None
        self._file: Any = None

    def day_of(self, when: dt.datetime) -> str:
        return (when.astimezone(dt.timezone.utc) + self.offset).strftime("%Y-%m-%d")

    def path_for(self, day: str) -> Path:
        return self.directory / f"{self.prefix}-{day}.jsonl"

    def log(self, record: Mapping[str, Any]) -> None:
        when = (
            dt.datetime.fromisoformat(record["time"])
            if "time" in record
            else dt.datetime.now(dt.timezone.utc)
        )
        day = self.day_of(when)
        if day != self._day:
            self.close()
            self._file = open(self.path_for(day), "a", encoding="utf-8")  # noqa: SIM115 - kept open between records
            self._day = day
        self._file.write(json.dumps(_to_json_value(record), ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self._day = None


class TensorBoardSink:
    """Numeric fields as TensorBoard scalars (``<type>/<field>``, nested dicts joined with ``/``)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "TensorBoard logging needs the `tensorboard` package: pip install tensorboard"
            ) from err
        self.writer = SummaryWriter(str(log_dir))

    def log(self, record: Mapping[str, Any]) -> None:
        step = record.get("step")
        if step is None:
            return
        kind = record.get("type", "train")

        def scalars(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
            if isinstance(value, bool):
                return
            if isinstance(value, (int, float)):
                yield prefix, float(value)
            elif isinstance(value, Mapping):
                for k, v in value.items():
                    yield from scalars(f"{prefix}/{k}", v)

        for key, value in record.items():
            if key not in ("type", "step", "time"):
                for tag, number in scalars(f"{kind}/{key}", value):
                    self.writer.add_scalar(tag, number, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class ConsoleSink:
    """A progress bar over ``train`` records, other records printed as one line each."""

    def __init__(
        self, total_steps: int | None = None, *, initial: int = 0, fields: tuple[str, ...] = ("loss", "lr")
    ) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)
        self.fields = fields
        self.step = initial

    def log(self, record: Mapping[str, Any]) -> None:
        kind = record.get("type")
        if kind == "train":
            step = int(record.get("step", self.step + 1))
            self.bar.update(max(step - self.step, 0))
            self.step = step
            shown = {k: record[k] for k in self.fields if k in record}
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()})
        elif kind is not None:
            summary = ", ".join(
                f"{k}={v}"
                for k, v in record.items()
                if k not in ("type", "time") and not isinstance(v, (dict, list))
            )
            self._tqdm.write(f"[{kind}] {summary}")

    def close(self) -> None:
        self.bar.close()


class MetricsLogger:
    """Stamp records with time and type and hand them to every sink. Disabled loggers (non-main ranks) drop them."""

    def __init__(self, sinks: list[MetricsSink] | None = None, *, enabled: bool = True) -> None:
        self.sinks = list(sinks or []) if enabled else []

    def log(self, kind: str, step: int | None = None, /, **values: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"type": kind, "time": dt.datetime.now(dt.timezone.utc).isoformat()}
        if step is not None:
            record["step"] = int(step)
        record.update(values)
        for sink in self.sinks:
            sink.log(record)
        return record

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _metric_files(directory: Path, prefix: str) -> list[Path]:
    return sorted(directory.glob(f"{prefix}-*.jsonl"))


def read_records(
    directory: str | os.PathLike, *, prefix: str = "metrics", kind: str | None = None
) -> Iterator[dict[str, Any]]:
    """All records of a run in order (a torn last line of a live file is skipped)."""
    for path in _metric_files(Path(directory), prefix):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # still being written
                try:
                    record = decode_line(line)
                except json.JSONDecodeError:
                    continue
                if kind is None or record.get("type") == kind:
                    yield record


class RecordTailer:
    """Incremental reader for a live run: each ``poll()`` returns the records appended since the last one."""

    def __init__(self, directory: str | os.PathLike, *, prefix: str = "metrics") -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.offsets: dict[Path, int] = {}

    def poll(self, max_bytes: int | None = None) -> list[dict[str, Any]]:
        """Records appended since the last call; with ``max_bytes``, stop after about that many bytes (at a
        line end; call again for the rest), so a long run can be read in bounded memory."""
        out: list[dict[str, Any]] = []
        budget = max_bytes
        for path in _metric_files(self.directory, self.prefix):
            if budget is not None and budget <= 0:
                break
            start = self.offsets.get(path, 0)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < start:  # truncated or replaced: read again from the top
                start = 0
            if size == start:
                continue
            length = size - start if budget is None else min(size - start, budget)
            with open(path, "rb") as f:
                f.seek(start)
                chunk = f.read(length)
                if length < size - start and b"\n" not in chunk:
                    chunk += f.readline()  # a line longer than the budget: read it whole
            end = chunk.rfind(b"\n") + 1  # only complete lines
            if budget is not None:
                budget -= max(end, 1)
            for line in chunk[:end].splitlines():
                try:
                    out.append(decode_line(line))
                except json.JSONDecodeError:
                    continue
            self.offsets[path] = start + end
        return out
