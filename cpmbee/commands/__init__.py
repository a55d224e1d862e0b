"""Subcommands of the ``cpmbee`` CLI (registered in ``cpmbee.__main__.COMMANDS``)."""
