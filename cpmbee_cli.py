"""The ``cpmbee`` console script. Being imported first, it tells ``cpmbee/__init__.py`` that the command
line is starting, which then defers loading torch and transformers until a command needs them (so
``cpmbee --help`` is fast); ``python -m cpmbee`` runs the same commands."""

from __future__ import annotations


def main() -> None:
    from cpmbee.__main__ import main as run

    run()
