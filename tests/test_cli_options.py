"""One option vocabulary across commands: shared groups, one --dtype, generation flags from
GenerationOptions, docs/cli.md listing them, and a command line that parses without torch."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from cpmbee.__main__ import COMMANDS, cli
from cpmbee.commands.options import DTYPE, ModelArgs, pop_generation_options
from cpmbee.generation_options import GenerationOptions

from .conftest import REPO_ROOT

MODEL_COMMANDS = ("generate", "eval", "serve")


def _command(name: str) -> click.Command:
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    return command


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name}


def test_every_dtype_option_is_the_shared_one():
    seen = []
    for name in COMMANDS:
        if name == "lm-eval":  # lm-eval's own argument parser (dtype goes in --model_args)
            continue
        command = _command(name)
        for sub in [command, *getattr(command, "commands", {}).values()]:
            option = _options(sub).get("dtype")
            if option is not None:
                assert option.type is DTYPE, f"{name}: --dtype is not the shared DTYPE"
                seen.append(name)
    assert {"generate", "eval", "serve", "convert", "merge-lora", "finetune"} <= set(seen)


def test_model_commands_share_the_model_group():
    fields = {f.name for f in ModelArgs.__dataclass_fields__.values()}
    for name in MODEL_COMMANDS:
        options = _options(_command(name))
        assert fields <= set(options), f"{name} lacks {sorted(fields - set(options))}"
        reference = _options(_command("generate"))
        for field in fields:
            assert options[field].help == reference[field].help, (name, field)


def test_generation_flags_come_from_generation_options():
    options = _options(_command("generate"))
    for name, field in GenerationOptions.model_fields.items():
        assert name in options and field.description and field.description in options[name].help
    given = {"beam_size": 2, "stop": ("a", "b"), "seed": None, "other": 1}
    assert pop_generation_options(given) == {"beam_size": 2, "stop": ["a", "b"]} and given == {"other": 1}


def test_dtype_aliases_and_errors():
    assert DTYPE.convert("bf16", None, None) == "bfloat16"
    assert DTYPE.convert("FP32", None, None) == "float32"
    with pytest.raises(click.BadParameter, match="float32, bfloat16, float16"):
        DTYPE.convert("int4", None, None)
    result = CliRunner().invoke(cli, ["generate", "--dtype", "fp64", "{}"])
    assert result.exit_code == 2 and "unknown dtype 'fp64'" in result.output


def test_docs_list_the_vocabulary():
    text = (REPO_ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for field in ModelArgs.__dataclass_fields__:
        assert f"`--{field.replace('_', '-')}" in text, field
    for field in GenerationOptions.model_fields:
        assert f"--{field.replace('_', '-')}" in text, field


# Commands whose module still loads torch at import (so `cpmbee --help`, which lists every command, does):
KNOWN_HEAVY = {"finetune": "cpmbee.train.finetune_args imports cpmbee.train.schedule, which imports torch"}


def test_the_command_line_parses_without_torch():
    """A command's --help loads neither torch nor transformers (the CLI marks itself with the cpmbee_cli
    module, so `import cpmbee` stays lazy); with no heavy command left, neither does `cpmbee --help`."""
    code = (
        "import sys, cpmbee_cli\n"
        "from click.testing import CliRunner\n"
        "from cpmbee.__main__ import cli\n"
        "assert CliRunner().invoke(cli, sys.argv[1:] + ['--help']).exit_code == 0\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    heavy = {}
    # `cpmbee lm-eval --help` is lm-eval's own help: the command hands every argument to lm-eval
    for args in ([], *([name] for name in sorted(COMMANDS) if name != "lm-eval")):
        res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        if res.stdout.strip():
            heavy[" ".join(args) or "(cpmbee --help)"] = res.stdout.strip()
    expected = {name: "torch" for name in KNOWN_HEAVY}
    if KNOWN_HEAVY:
        expected["(cpmbee --help)"] = "torch"
    assert heavy == expected
