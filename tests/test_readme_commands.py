"""README's walkthrough sections against the real command lines: every `edgekit ...` and `edgekit-agent ...` command
a section shows names a real command, and every option it passes or names is in that command's ``--help``."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"
_SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "("}
# An option row of typer's help table: the border, the required marker column, then the option names.
_OPTION_ROW = re.compile(r"^[│|][\s*]{1,6}(-{1,2}[\w-]+(?:[\s,/]+-{1,2}[\w-]+)*)")


def _apps() -> dict[str, typer.Typer]:
    from device_agent.cli import app as agent_app
    from edgekit.cli import app as edgekit_app

    return {"edgekit": edgekit_app, "edgekit-agent": agent_app}


def section_text(title: str) -> str:
    """The README section under ``## title``, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def command_lines(section: str) -> list[str]:
    """The edgekit and edgekit-agent commands of the section: code-block lines (``\\`` continuations joined) and
    inline code spans, shell operators and what follows them cut off, ``[--optional]`` brackets dropped."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    candidates = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", section, flags=re.MULTILINE | re.DOTALL)
    candidates += re.findall(r"`([^`]+)`", re.sub(r"\n\s*", " ", prose))
    commands = []
    for candidate in candidates:
        lexer = shlex.shlex(candidate, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for word in lexer:
            if word in _SHELL_OPERATORS:
                break
            words.append(word.strip("[]"))
        if words and words[0] in ("edgekit", "edgekit-agent"):
            commands.append(shlex.join(word for word in words if word))
    return commands


def resolve(command: str) -> tuple[str, list[str], list[str]]:
    """(program, subcommand path, options used) of a command line; the path must end at a command, not a group."""
    program, *words = shlex.split(command)
    current = typer.main.get_command(_apps()[program])  # typer's own click: groups are told by their `commands`
    path: list[str] = []
    for word in words:
        if word not in getattr(current, "commands", {}):
            break
        current = current.commands[word]
        path.append(word)
    group = getattr(current, "commands", None)
    assert group is None, f"`{command}`: {program} {' '.join(path)} needs one of its commands: {', '.join(group or [])}"
    options = [word.split("=", 1)[0] for word in words if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", word)]
    return program, path, options


@cache
def help_options(program: str, path: tuple[str, ...]) -> frozenset[str]:
    """The option names in the help table of ``program path --help``, rendered wide so that no row wraps."""
    result = CliRunner().invoke(_apps()[program], [*path, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    names = set()
    for line in result.output.splitlines():
        row = _OPTION_ROW.match(line)
        if row:
            names.update(re.findall(r"-{1,2}[\w-]+", row.group(1)))
    assert "--help" in names, f"could not read the option table of `{program} {' '.join(path)} --help`:\n{result.output}"
    return frozenset(names)


def unknown_options(command: str) -> list[str]:
    program, path, options = resolve(command)
    known = help_options(program, tuple(path))
    return [option for option in options if option not in known]


# Each checked section, with the commands it must keep showing.
SECTIONS = {
    "Rolling out to a fleet": {
        "edgekit fleet devices add", "edgekit fleet serve", "edgekit-agent serve", "edgekit fleet deploy",
        "edgekit fleet rollouts", "edgekit fleet rollout show", "edgekit fleet rollout abort",
        "edgekit fleet devices rotate-token", "edgekit fleet devices remove"},
    "Federated fine-tuning": {
        "edgekit federated simulate", "edgekit federated server", "edgekit federated client", "edgekit keys generate"},
    "Explaining predictions and retraining on drift": {
        "edgekit explain", "edgekit fleet export-samples", "edgekit fleet report", "edgekit retrain", "edgekit compare",
        "edgekit-agent serve"},
}
COMMANDS = [(title, command) for title in SECTIONS for command in command_lines(section_text(title))]


@pytest.mark.parametrize("title", SECTIONS)
def test_the_section_shows_its_commands(title):
    paths = {" ".join([program, *path]) for program, path, _ in map(resolve, command_lines(section_text(title)))}
    assert SECTIONS[title] <= paths, f"'{title}' no longer shows {sorted(SECTIONS[title] - paths)}"


@pytest.mark.parametrize(("title", "command"), COMMANDS)
def test_every_option_in_a_section_is_in_its_commands_help(title, command):
    assert unknown_options(command) == [], f"'{title}': `{command}` uses options its --help does not list"


@pytest.mark.parametrize("title", SECTIONS)
def test_every_option_the_prose_names_belongs_to_a_command_of_the_section(title):
    commands = command_lines(section_text(title))
    known = set().union(*(help_options(program, tuple(path)) for program, path, _ in map(resolve, commands)))
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", section_text(title), flags=re.MULTILINE | re.DOTALL)
    named = set(re.findall(r"`(--[a-z][\w-]*)", re.sub(r"\n\s*", " ", prose)))
    assert named and named <= known, f"'{title}' names options no command of it has: {sorted(named - known)}"


def test_a_stale_option_or_command_is_caught():
    assert unknown_options("edgekit fleet devices add jetson-01 --rotate") == ["--rotate"]
    assert command_lines("```bash\nedgekit fleet deploy x.ekb --wave-timout 60 \\\n  [--json] > out.json\n```\n") == [
        "edgekit fleet deploy x.ekb --wave-timout 60 --json"]
    assert unknown_options("edgekit fleet deploy x.ekb --wave-timout 60 --json") == ["--wave-timout"]
    with pytest.raises(AssertionError, match="needs one of its commands"):
        resolve("edgekit fleet rollout")
