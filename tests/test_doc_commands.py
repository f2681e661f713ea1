"""The commands in README.md and docs/design.md paste and run: every `python train.py ...`, `python
finetune_classifier.py ...`, `python chat.py ...` and `python -m experiments.rank_sweep ...` line of their bash blocks
parses with the program's own command line (a flag, choice or value it would refuse fails here), train.py's settings pass
its checks, and nothing is piped into a word that is not a program (`--mode head|lora` runs `lora` as a command)."""

import os
import re
import shlex

import pytest

import chat
import finetune_classifier
import train
from experiments import rank_sweep
from support import cli, export
from support.cli import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", os.path.join("docs", "design.md"))
PROGRAMS = {
    "train.py": train.parse_args,
    "finetune_classifier.py": finetune_classifier.parse_args,
    "chat.py": lambda argv: parse_config(chat.ChatConfig, argv),
    "experiments.rank_sweep": rank_sweep.parse_args,
    "support.export": export.parse_args,
}
COMMANDS = {
    "python",
    "python3",
    "pip",
    "jupyter",
    "torchrun",
    "pytest",
    "printf",
    "echo",
    "cat",
    "git",
    "cd",
    "time",
    "env",
    "nice",
    "taskset",
    "timeout",
    "export",
    "source",
    "bash",
    "sh",
    "ls",
    "mkdir",
    "cp",
    "mv",
    "rm",
    "head",
    "tail",
    "grep",
    "tar",
    "unzip",
    "curl",
    "wget",
}  # what a documented line may run (the first word after VAR=value)


def shell_lines(path):
    """(line number, command line) of each bash block of a Markdown file, continuation lines joined."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    found = []
    for block in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        first = text[: block.start()].count("\n") + 2
        pending, start = "", None
        for number, line in enumerate(block.group(1).splitlines(), first):
            start = number if not pending else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append((start, pending + line))
            pending = ""
    return found


def program_calls(line):
    """The (program, its arguments) that a command line runs, and the words that follow a | or && or ;."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = list(lexer)
    segments, current = [], []
    for word in words + [";"]:
        if word in ("|", "||", "&&", ";"):
            segments.append(current)
            current = []
        else:
            current.append(word)
    calls = []
    for segment in filter(None, segments):
        segment = [
            w
            for i, w in enumerate(segment)
            if not (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w) and all("=" in v for v in segment[:i]))
        ] or ["true"]
        assert segment[0] in COMMANDS | {"true"}, (
            f"runs {segment[0]!r}: a '|' or '&&' inside what was meant as one value?"
        )
        for i, word in enumerate(segment):
            name = os.path.basename(word)
            if name in PROGRAMS and ({"python", "python3", "torchrun"} & set(segment[:i]) or segment[i - 1] == "-m"):
                calls.append((name, segment[i + 1 :]))
                break
    return calls


def all_calls():
    return [
        (f"{path}:{number}", name, argv)
        for path in DOCS
        for number, line in shell_lines(path)
        for name, argv in program_calls(line)
    ]


def test_the_docs_hold_commands_of_every_program():
    names = {name for _, name, _ in all_calls()}
    assert {"train.py", "finetune_classifier.py"} <= names, names


@pytest.mark.parametrize("where,name,argv", all_calls(), ids=[where for where, _, _ in all_calls()])
def test_each_command_parses_and_passes_the_checks(where, name, argv, capsys):
    try:
        cfg = PROGRAMS[name](argv)
    except SystemExit:
        pytest.fail(f"{where}: `{name} {' '.join(argv)}` is refused: {capsys.readouterr().err.strip()}")
    if name == "train.py":
        cli.check_train_config(train.resolve_defaults(cfg))
    if name == "chat.py":
        cli.check_answer_flags(cfg)


def test_the_check_catches_what_the_issue_found():
    """The README line that ran as a pipeline (issue 27), and a flag the program does not have."""
    with pytest.raises(AssertionError, match="runs 'lora'"):
        program_calls("python finetune_classifier.py --mode head|lora|qlora|full")
    [(name, argv)] = program_calls("python train.py --data_pth x.json   # a typo")
    with pytest.raises(SystemExit):
        PROGRAMS[name](argv)
    assert program_calls("printf 'a\\nb\\n' | python chat.py --adapter none") == [("chat.py", ["--adapter", "none"])]
    assert program_calls("python -m experiments.rank_sweep --quick") == [("experiments.rank_sweep", ["--quick"])]
    assert program_calls("OMP_NUM_THREADS=1 taskset -c 0 python train.py --max_iters 5") == [
        ("train.py", ["--max_iters", "5"])
    ]
