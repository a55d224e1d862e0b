"""Serving CPM-Bee over HTTP (``cpmbee serve``): FastAPI app, dynamic batching worker, OpenAI adapters.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client): ``pip install 'cpmbee[serve]'``.
See docs/serving.md.
"""

from __future__ import annotations

from .app import create_app
from .engine import Engine, QueueFull
from .protocol import Limits
from .server import load_engine, run_server

__all__ = ["Engine", "Limits", "QueueFull", "create_app", "load_engine", "run_server"]
