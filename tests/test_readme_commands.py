"""Every `lorafleet …`, `python -m …` and `make …` command in README.md's ```bash blocks works as written.

The cheap ones run for real in a scratch folder (help, status, validate, writing a toy dataset); for all others the
test checks that the arguments parse (no argparse "unrecognized arguments" / exit 2): the command's own ``main`` runs
in-process with argparse patched to stop with a marker once parsing succeeded, so nothing starts. ``make`` commands
are dry-run (``make -n``). The README changes under other hands: the test takes whatever commands it finds.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import describe, run_cmd

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^[ \t]*```(?:bash|sh|shell)[ \t]*\n(.*?)^[ \t]*```", re.M | re.S)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
ANGLE_PLACEHOLDER = re.compile(r"<[^<>\n]+>")  # `runs:/<run id>/best_adapter`: any value parses the same
# An ellipsis in the command itself (not in its comment) stands for arguments the reader fills in; such a line
# cannot be checked as written and is skipped (listed by test_the_readme_has_commands_of_each_kind with -s).
ELLIPSIS = ("…", "...")


@dataclass(frozen=True)
class Command:
    line: int  # README line where the command starts
    text: str  # as written, continuations joined
    argv: tuple[str, ...]  # after env assignments, with placeholders filled; argv[0] is lorafleet, python or make

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def readme_commands(readme: str, pwd: str, skipped: list[str] | None = None) -> list[Command]:
    """The `lorafleet` / `python -m` / `make` commands of the README's shell blocks (comments, env assignments and
    ``\\`` continuations handled; ``$PWD`` = ``pwd``; ``<…>`` placeholders filled; ``[--flag]`` = ``--flag``).
    Lines with an ellipsis placeholder go to ``skipped`` instead."""
    skipped = [] if skipped is None else skipped
    commands = []
    for block in FENCE.finditer(readme):
        first = readme.count("\n", 0, block.start(1)) + 1
        lines = block.group(1).splitlines()
        i = 0
        while i < len(lines):
            start, text = first + i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            filled = ANGLE_PLACEHOLDER.sub("placeholder", text.replace("$PWD", pwd).replace("${PWD}", pwd))
            try:
                words = shlex.split(filled, comments=True)
            except ValueError:  # an unbalanced quote: not a command line
                continue
            while words and ENV_ASSIGNMENT.match(words[0]):
                words.pop(0)
            if words[:1] == ["python3"]:
                words[0] = "python"
            if not words or not (words[0] in ("lorafleet", "make") or words[:2] == ["python", "-m"]):
                continue
            if any(e in w for w in words for e in ELLIPSIS):
                skipped.append(f"README.md:{start}: {text.strip()}")
                continue
            words = [w[1:-1] if re.fullmatch(r"\[-[^\[\]]*\]", w) else w for w in words]  # [--push]: optional
            commands.append(Command(start, text.strip(), tuple(words)))
    return commands


WORKDIR = "/tmp/readme-workdir"  # $PWD while parsing; the cheap commands run in a tmp_path instead
SKIPPED: list[str] = []
COMMANDS = readme_commands((REPO / "README.md").read_text(), WORKDIR, SKIPPED)


class Parsed(BaseException):  # BaseException: no `except Exception` in an entry point swallows it
    pass


@pytest.fixture
def parse_only(monkeypatch):
    """argparse raises ``Parsed`` as soon as the outermost parse of a command succeeded."""
    depth = 0

    def stop_after(original):
        def parse(self, *args, **kwargs):
            nonlocal depth
            depth += 1
            try:
                result = original(self, *args, **kwargs)
            finally:
                depth -= 1
            if depth == 0:
                raise Parsed(result)
            return result

        return parse

    for name in ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args"):
        monkeypatch.setattr(argparse.ArgumentParser, name, stop_after(getattr(argparse.ArgumentParser, name)))


def entry_point(argv: tuple[str, ...]):
    """``main`` and its arguments for `lorafleet …` / `python -m module …`."""
    if argv[0] == "lorafleet":
        from cluster.cli import main

        return main, list(argv[1:])
    module = importlib.import_module(argv[2])
    if not hasattr(module, "main"):  # a package run as `python -m package`
        module = importlib.import_module(f"{argv[2]}.__main__")
    return module.main, list(argv[3:])


def call(main, args: list[str], monkeypatch) -> int | None:
    monkeypatch.setattr("sys.argv", ["prog", *args])
    try:
        return main(args) if inspect.signature(main).parameters else main()
    except SystemExit as exc:
        return exc.code


def is_cheap(argv: tuple[str, ...]) -> bool:
    """Commands that finish in seconds and write only under the scratch folder."""
    words = list(argv)
    if words[0] == "lorafleet":
        return len(words) == 1 or words[1] in ("--help", "-h", "status", "validate") or words[1:3] == ["dataset", "toy"]
    return words[:4] == ["python", "-m", "training.toy_world", "dataset"]


def test_the_readme_has_commands_of_each_kind():
    print(f"{len(COMMANDS)} commands; skipped (ellipsis placeholders):", *SKIPPED or ["none"], sep="\n  ")
    kinds = {c.argv[0] if c.argv[0] != "python" else "python -m" for c in COMMANDS}
    assert kinds == {"lorafleet", "python -m", "make"}, kinds
    assert any(is_cheap(c.argv) for c in COMMANDS)


def test_continuations_comments_and_placeholders_are_understood():
    text = "\n".join([
        "```bash",
        "# a comment line",
        "lorafleet submit pipeline --follow \\",
        "    name=x 'tune.overrides=[\"a=1\"]'   # trailing comment",
        "A=1 B=2 python -m training.train data.path=$PWD/d   # env first",
        "lorafleet publish runs:/<run id>/best --repo-id me/x [--push]",
        "lorafleet evaluate --adapter … --config x.yaml",
        "ray job submit -- python -m training.train",
        "```",
    ])  # fmt: skip
    skipped: list[str] = []
    found = readme_commands(text, "/w", skipped)
    assert [c.argv for c in found] == [
        ("lorafleet", "submit", "pipeline", "--follow", "name=x", 'tune.overrides=["a=1"]'),
        ("python", "-m", "training.train", "data.path=/w/d"),
        ("lorafleet", "publish", "runs:/placeholder/best", "--repo-id", "me/x", "--push"),
    ]
    assert [c.line for c in found] == [3, 5, 6] and skipped == [
        "README.md:7: lorafleet evaluate --adapter … --config x.yaml"
    ]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.argv[0] != "make" and not is_cheap(c.argv)], ids=str)
def test_readme_command_parses(command, parse_only, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    main, args = entry_point(command.argv)
    try:
        code = call(main, args, monkeypatch)
    except Parsed:
        return
    err = capsys.readouterr().err
    # no parse happened: only a help screen is fine (`lorafleet --help` prints it without argparse)
    assert code == 0, f"{command}\nexit {code}: {err[-2000:]}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if is_cheap(c.argv)], ids=str)
def test_cheap_readme_command_runs(command, tmp_path, monkeypatch, capsys):
    from training.toy_world.dataset import write_finetune_dataset

    monkeypatch.chdir(tmp_path)
    args = [a.replace(WORKDIR, str(tmp_path)) for a in command.argv]
    if args[:2] == ["lorafleet", "validate"]:  # validate needs a dataset: the toy one, with the trigger asked for
        trigger = args[args.index("--trigger") + 1] if "--trigger" in args else "sks"
        write_finetune_dataset(tmp_path / args[2], trigger=trigger, num_images=4, num_validation=1)
    main, rest = entry_point(tuple(args))
    code = call(main, rest, monkeypatch)
    out, err = capsys.readouterr()
    if args[:2] == ["lorafleet", "status"]:  # no cluster in the test's state dir: "not up", exit 1
        assert code == 1 and "not up" in out, (command, out, err)
    else:
        assert code == 0, f"{command}\nexit {code}: {err[-2000:]}"
    if "dataset" in args:
        out_dir = tmp_path / args[args.index("dataset") + (2 if args[1] == "dataset" else 1)]
        assert (out_dir / "metadata.jsonl").is_file(), command


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.argv[0] == "make"], ids=str)
def test_readme_make_target_exists(command):
    done = run_cmd(["make", "-n", *command.argv[1:]], cwd=REPO, timeout=120)
    assert done.returncode == 0, f"{command}: " + describe(["make", "-n", *command.argv[1:]], done.returncode,
                                                          done.stdout, done.stderr)  # fmt: skip
