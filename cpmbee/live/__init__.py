"""Watching a training run: the live dashboard (``cpmbee live``) and the daily training logs
(``cpmbee report``).

Both only *read* a run directory (``docs/run-directory.md``), so they can be attached to a running job at
any time, detached, pointed at a finished run, and they survive the job's restarts. The reader
(:mod:`cpmbee.live.state`) and the daily reports (:mod:`cpmbee.live.report`) need nothing beyond the
package's own dependencies (HTML reports use ``markdown``); the web server (:mod:`cpmbee.live.server`)
needs the ``live`` extra: ``pip install 'cpmbee[live]'``.
"""

from __future__ import annotations

from .state import RunState, estimate_eta, load_json_file, log_offset_hours

__all__ = ["RunState", "estimate_eta", "load_json_file", "log_offset_hours"]
