"""argparse help for every command: a one-line summary, a description and worked examples."""

from __future__ import annotations

import argparse
import textwrap

__all__ = ["HelpFormatter", "add_command"]


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that indented lines (examples) are kept as written.

    Paragraphs of descriptions are wrapped to the terminal as usual.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        for block in text.split("\n\n"):
            lines = block.splitlines()
            if any(line.startswith(" ") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(
                    textwrap.fill(
                        " ".join(block.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                    )
                )
        return "\n\n".join(out)


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    summary: str,
    examples: list[str],
    description: str = "",
) -> argparse.ArgumentParser:
    """Add the command ``name``: ``summary`` is its line in the command list and in its help.

    ``description`` (optional) follows the summary; ``examples`` are shown under "examples:".
    """
    text = summary[0].upper() + summary[1:] + "."
    if description:
        text += " " + description
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    return sub.add_parser(
        name,
        help=summary,
        description=text,
        epilog=epilog,
        formatter_class=HelpFormatter,
    )
