"""Every dataset-script command the README prints, paper-scale ones included, parses with that script's own
flags: a renamed or removed flag, or a value its check refuses, fails here before a reader copies it."""
import re
import shlex
from pathlib import Path

import pytest
from conftest import SCRIPTS

from mirl.cli import downstream_parser, pretrain_parser

README = Path(__file__).resolve().parent.parent / "README.md"
SEPARATORS = {"&&", "||", ";", "|", ">", "2>&1", "&"}


def script_commands() -> list[tuple[str, list[str]]]:
    """(script, its arguments) of each command line in the README's shell blocks that runs a dataset script; a
    loop's variable (`for E in 10 25; do`) takes its first value."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README.read_text(), re.S):
        for name, values in re.findall(r"for (\w+) in ([^;\n]+);", block):
            block = re.sub(rf"\$\{{{name}\}}|\${name}\b", values.split()[0], block)
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for start, word in enumerate(words):
                if Path(word).name in SCRIPTS:
                    arguments = []
                    for argument in words[start + 1:]:
                        if argument in SEPARATORS:
                            break
                        arguments.append(argument)
                    commands.append((Path(word).name, arguments))
    return commands


def test_the_readme_prints_every_kind_of_script():
    assert {script for script, _ in script_commands()} >= {"trainMoCo.py", "trainMoCoV2.py", "MoCo_downstream.py",
                                                           "MoCov2_downstream.py", "trainDINO.py"}


@pytest.mark.parametrize("script, arguments", script_commands(), ids=lambda value: " ".join(value)
                         if isinstance(value, list) else value)
def test_each_printed_command_parses_with_its_scripts_flags(script, arguments):
    kind, method = SCRIPTS[script]
    parser = (pretrain_parser if kind == "pretrain" else downstream_parser)("rsna", method, Path("RSNA_MoCo"))
    parser.parse_args(arguments)  # exits with code 2 and the reason on a flag the script does not take
