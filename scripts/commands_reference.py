#!/usr/bin/env python
"""Print the README's command reference (markdown) from the CLI itself.

    python scripts/commands_reference.py > /tmp/commands.md
"""
from __future__ import annotations

import click

from conceptmon.cli import main


def commands(group: click.Group, prefix=()):
    for name in sorted(group.commands):
        cmd = group.commands[name]
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def first_sentence(text: str) -> str:
    text = " ".join((text or "").split())
    for abbreviation in ("e.g.", "i.e."):
        text = text.replace(abbreviation, abbreviation.replace(".", "\0"))
    sentence = text.split(". ")[0].rstrip(".").replace("\0", ".")
    return sentence + "." if sentence else ""


def reference() -> str:
    lines = []
    for path, cmd in commands(main):
        args = " ".join(p.human_readable_name for p in cmd.params if isinstance(p, click.Argument))
        lines.append(f"**`conceptmon {' '.join(path)}{(' ' + args) if args else ''}`**: {first_sentence(cmd.help)}")
        lines.append("")
        options = [p for p in cmd.params if isinstance(p, click.Option) and p.name != "help"]
        if options:
            lines.append("| option | what it does |")
            lines.append("| --- | --- |")
            for opt in options:
                names = ", ".join(f"`{o}`" for o in opt.opts)
                text = " ".join((opt.help or "").split()).replace("|", "\\|")
                lines.append(f"| {names} | {text} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference())
