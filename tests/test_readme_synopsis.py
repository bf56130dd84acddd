"""The README's command synopsis ("Command line") is what ``--help`` prints: for every command of the
``desap`` parser, down to each benchmark, the README holds the exact ``usage:`` lines argparse
prints at a terminal 100 columns wide, and no others. An option added to or removed from a
command, a new command or a changed choice list fails here until the README says the same.
The README also opens with the set-up, the main job and the test command CI runs."""
import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

from desap_ops.cli.main import parser

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = "100"   # argparse wraps usage at the terminal's width (COLUMNS - 2): fixed, so lines are too


def readme_usages() -> dict[str, str]:
    """The README's synopsis: its one fenced block of ``usage: desap ...`` lines, split per
    command, keyed by the command's words (``"desap bench op"``)."""
    blocks = [b for b in re.findall(r"```text\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
              if b.startswith("usage: desap")]
    assert len(blocks) == 1, f"README.md holds {len(blocks)} synopsis blocks (```text starting 'usage: desap'), needs 1"
    usages = {}
    for usage in re.split(r"\n\s*\n", blocks[0].strip()):
        command = re.match(r"usage: ((?:desap)(?: [a-z0-9]+)*)", usage).group(1)
        assert command not in usages, f"README.md gives the usage of {command!r} twice"
        usages[command] = usage.rstrip()
    return usages


def commands(top: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the parser as the words after ``desap``: the top, each subcommand, each
    subcommand's subcommands."""
    found = [words]
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, words + (name,))
    return found


def help_usage(words: tuple[str, ...], monkeypatch) -> str:
    """The ``usage:`` part of ``desap WORDS --help`` (up to its first blank line), as printed."""
    monkeypatch.setenv("COLUMNS", COLUMNS)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        parser().parse_args([*words, "--help"])
    assert exit_.value.code == 0
    return out.getvalue().split("\n\n", 1)[0].rstrip()


COMMANDS = commands(parser())


def test_the_readme_synopsis_names_every_command_and_no_other():
    assert sorted(readme_usages()) == sorted(" ".join(("desap",) + words) for words in COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words) or "desap")
def test_the_readme_synopsis_equals_help(words, monkeypatch):
    command = " ".join(("desap",) + words)
    assert readme_usages().get(command) == help_usage(words, monkeypatch), (
        f"README.md's usage of {command!r} differs from `{command} --help` at COLUMNS={COLUMNS}: "
        f"paste the usage lines that command prints")



def test_the_readme_opens_with_the_set_up_the_main_job_and_the_test_command():
    """The README's first two blocks are the set-up and the main job, then the test command: the
    main job is a command the parser accepts, and the test command is one CI runs as written."""
    blocks = re.findall(r"```(\w*)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (lang1, setup), (lang2, test) = blocks[:2]
    commands = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert (lang1, lang2) == ("bash", "bash") and commands[0].startswith("pip install torch==")
    assert len(commands) == 2 and commands[1].split()[0] == "desap"
    assert parser().parse_args(commands[1].split()[1:]).command == "demo"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test.strip() in ci, f"README's test command {test.strip()!r} is not a line .ci/run runs"
