"""Writing the run directory's small files (``docs/run-directory.md``): ``run.json``, ``status.json`` and
incident files, each replaced atomically so a reader (the live dashboard) never sees a torn one."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RunDirectory", "now_iso", "write_json_atomic"]


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _job_alive(pid: int) -> bool:
    """Whether ``pid`` is a live cpmbee process (a recycled pid of another program does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # pragma: no cover - no procfs
        return True
    return any(a == "cpmbee" or a.endswith("/cpmbee") for a in args)  # `cpmbee ...` or `python -m cpmbee ...`


class RunDirectory:
    """The files of one run directory that the main process writes besides metrics and checkpoints."""

    def __init__(self, path: str | os.PathLike, *, status_every_s: float = 5.0) -> None:
        self.path = Path(path)
        self.status_every_s = status_every_s
        self._last_status = 0.0

    def create(self) -> None:
        for sub in ("metrics", "checkpoints", "incidents"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def previous_state(self) -> str | None:
        """The state the last job left in ``status.json`` (``RuntimeError`` if that job still runs here)."""
        try:
            status = json.loads((self.path / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        state = status.get("state")
        if (
            state == "running"
            and status.get("host") == socket.gethostname()
            and _job_alive(int(status.get("pid", -1)))
        ):
            raise RuntimeError(f"{self.path} is in use by a running job (pid {status['pid']})")
        return state

    def write_run(self, info: Mapping[str, Any]) -> None:
        """``run.json``; ``created`` is kept from an earlier version of the file (a resumed run)."""
        path = self.path / "run.json"
        created = now_iso()
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                created = json.loads(path.read_text(encoding="utf-8")).get("created", created)
        write_json_atomic(path, {"name": info.get("name"), "created": created, "updated": now_iso(), **info})

    def write_status(
        self, state: str, step: int, tokens_seen: int, force: bool = False, **extra: Any
    ) -> None:
        """``status.json``, at most every ``status_every_s`` seconds unless ``force``."""
        if not force and time.monotonic() - self._last_status < self.status_every_s:
            return
        self._last_status = time.monotonic()
        status = {
            "state": state,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "step": step,
            "tokens_seen": tokens_seen,
            "updated": now_iso(),
        }
        write_json_atomic(self.path / "status.json", {**status, **extra})

    def write_incident(self, step: int, kind: str, message: str, detail: Any, samples: Any) -> str:
        """``incidents/step-XXXXXXXX-<kind>.json``; returns its path relative to the run directory."""
        name = f"step-{step:08d}-{kind}.json"
        write_json_atomic(
            self.path / "incidents" / name,
            {
                "step": step,
                "kind": kind,
                "message": message,
                "detail": detail,
                "time": now_iso(),
                "samples": samples,
            },
        )
        return f"incidents/{name}"
