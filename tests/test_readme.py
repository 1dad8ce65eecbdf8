"""README.md's commands against the CLI itself, through the Typer app's click objects (no subprocess):

- every `quantkit SUBCOMMAND ...` in a ```bash block names a subcommand quantkit has and only options that
  subcommand takes, and parses as quantkit would parse it (choices, values, the number of arguments), with no
  placeholder (SRC, OUT, MODEL.gguf) where a real path belongs;
- the synopses in ```text blocks and the `quantkit ...` spans in the prose name real subcommands and options.

Whether a command also succeeds (its inputs exist) is walked by hand; this catches a renamed or made-up option.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
OPTION = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")  # --double-quant/--no-double-quant gives both; fp8-block none
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?")  # SRC, OUT, FP8_MODEL, MODEL.gguf
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")


def blocks(text: str, lang: str) -> list[tuple[int, list[str]]]:
    """The fenced blocks of `lang`: (line number of their first line, their lines)."""
    found, lines, start = [], text.splitlines(), None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == f"```{lang}":
            start = number + 1
        elif start is not None and line.strip() == "```":
            found.append((start, lines[start - 1 : number - 1]))
            start = None
    return found


def shell_commands(text: str) -> list[tuple[int, list[str]]]:
    """Each `quantkit ...` (or `python -m quantkit ...`) that the ```bash blocks run, as shell words."""
    commands = []
    for start, lines in blocks(text, "bash"):
        for number, line in enumerate(lines, start):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            segment: list[str] = []
            for word in [*lexer, ";"]:  # a pipe, &&, ; or $( ... ) ends a command
                if word and set(word) <= set("|&;()<>"):
                    while segment and ASSIGNMENT.match(segment[0]):
                        segment.pop(0)  # VAR=value quantkit ...
                    if segment[:3] == ["python", "-m", "quantkit"]:
                        segment = segment[2:]
                    if segment[:1] == ["quantkit"]:
                        commands.append((number, segment))
                    segment = []
                else:
                    segment.append(word)
    return commands


def mentions(text: str) -> list[tuple[int, list[str]]]:
    """The options each synopsis line of the ```text blocks (with its indented continuation lines) and each
    `quantkit ...` span of the prose names: (line number, ["quantkit", subcommand or nothing, options...])."""
    found: list[tuple[int, list[str]]] = []
    for start, lines in blocks(text, "text"):
        current = None
        for number, line in enumerate(lines, start):
            line = re.sub(r"\s#.*", "", line)
            if line.startswith("quantkit"):
                words = line.split()
                current = (number, words[:2] + OPTION.findall(" ".join(words[1:])))
                found.append(current)
            elif line[:1].isspace() and current is not None:
                current[1].extend(OPTION.findall(line))  # the synopsis of the command above, continued
            else:
                current = None
    fenced = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for number, line in enumerate(fenced.splitlines(), 1):
        for span in re.findall(r"`(quantkit(?: [^`]*)?)`", line):
            words = span.split()
            found.append((number, words[:2] + OPTION.findall(" ".join(words[1:]))))
    return found


def cli():
    import typer.main

    from quantkit.cli import app

    return typer.main.get_command(app)


def option_names(command: click.Command, help_names: list[str]) -> set[str]:
    names = set(help_names)
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts + param.secondary_opts)
    return names


def problems(words: list[str], strict: bool) -> list[str]:
    """What is wrong with `quantkit ...` as the CLI sees it. `strict` (a command a reader runs): also parse it
    as click does and refuse placeholders among the arguments."""
    root = cli()
    help_names = root.context_settings.get("help_option_names", ["--help"])
    args = words[1:]
    command, name = root, "quantkit"
    if args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
        if name not in root.commands:
            return [f"quantkit {name}: no such command (there are {', '.join(sorted(root.commands))})"]
        command = root.commands[name]
        name = f"quantkit {name}"
    found = [f"{name}: no option {word.split('=')[0]}" for word in args
             if OPTION.fullmatch(word.split("=")[0]) and word.split("=")[0] not in option_names(command, help_names)]
    if found or not strict or command is root:
        return found
    try:
        context = command.make_context(name, list(args), parent=click.Context(root, info_name="quantkit"))
    except click.UsageError as e:
        return [f"{name}: {e.format_message()}"]
    return [f"{name}: {value} is a placeholder, not a path" for param in command.params if isinstance(param, click.Argument)
            for value in [str(context.params[param.name])] if PLACEHOLDER.fullmatch(value)]


def check(text: str) -> tuple[int, list[str]]:
    """(how many commands were checked, the problems found, each with its README line)."""
    commands, names = shell_commands(text), mentions(text)
    found = [f"README.md:{n}: {p}" for n, words in commands for p in problems(words, strict=True)]
    found += [f"README.md:{n}: {p}" for n, words in names for p in problems(words, strict=False)]
    return len(commands) + len(names), found


def test_readme_commands_are_what_the_cli_takes():
    text = README.read_text()
    checked, found = check(text)
    assert not found, "\n".join(found)
    run = {words[1] for _, words in shell_commands(text)}
    assert {"inspect", "quantize", "dequantize", "convert", "verify"} <= run  # the blocks were read at all
    assert checked >= 40  # 35 run in the bash blocks, 12 named in synopses and prose (2026-11-29)


@pytest.mark.parametrize("snippet, expected", [
    ("```bash\nquantkit quantize build/a build/b --method nf4 --made-up-option\n```", "quantkit quantize: no option --made-up-option"),
    ("```bash\nM=x quantkit frobnicate build/a\n```", "quantkit frobnicate: no such command"),
    ("```bash\nquantkit dequantize MODEL.gguf build/out --force\n```", "MODEL.gguf is a placeholder"),
    ("```bash\nquantkit convert build/a build/b.gguf --to gguf --gguf-type Q9_0\n```", "Q9_0"),
    ("```bash\nquantkit verify build/a --reference --junit build/r.xml\n```", "unexpected extra argument"),
    ("```bash\nfoo && python -m quantkit inspect build/a --method=gptq --bitz 4  # a comment --no-such\n```",
     "quantkit inspect: no option --bitz"),
    ("```text\nquantkit verify PATH [--reference SRC]\n                [--strict] [--json]\n```", "quantkit verify: no option --strict"),
    ("Run `quantkit dequantize SRC OUT --dtypes float32` to ...", "quantkit dequantize: no option --dtypes"),
])  # fmt: skip
def test_the_check_finds_what_the_cli_does_not_take(snippet, expected):
    _, found = check(snippet)
    assert len(found) == 1 and expected in found[0], found


def test_the_check_finds_a_made_up_option_in_the_readme_itself():
    text = README.read_text()
    assert text.count("--group-size 64 --force") == 1
    _, found = check(text.replace("--group-size 64 --force", "--group-sise 64 --force"))
    assert [p.split(": ", 1)[1] for p in found] == ["quantkit quantize: no option --group-sise"]
