"""The docs guard the CLI: every command and every option has help and is in the README."""
from pathlib import Path

import click
import pytest

from conceptmon.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
REFERENCE = README.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]


def commands(group=main, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


COMMANDS = list(commands())


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_and_option_is_documented(path, cmd):
    assert (cmd.help or "").strip(), f"conceptmon {' '.join(path)} has no help"
    block = REFERENCE.split(f"**`conceptmon {' '.join(path)}", 1)
    assert len(block) == 2, f"conceptmon {' '.join(path)} is not in the README's command reference"
    block = block[1].split("\n**`conceptmon ", 1)[0]
    for param in cmd.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert (param.help or "").strip(), f"{' '.join(path)} {param.opts[0]} has no help"
            assert f"`{param.opts[0]}`" in block, f"{' '.join(path)} {param.opts[0]} is not in the README"


def test_the_reference_names_only_real_commands():
    import re

    named = set(re.findall(r"^\*\*`conceptmon ([a-z -]+?)(?: [A-Z_]+)*`\*\*", REFERENCE, flags=re.M))
    assert named == {" ".join(p) for p, _ in COMMANDS}
