"""The method contract: options are typed dataclasses whose fields are the scripts' flags, the flags need no
torch, every method plugs into the one loop through the same few methods, and nothing outside a method's own
module asks which method it is."""
import ast
import dataclasses
import importlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from conftest import run_entry, script_folder

from mirl.cli import pretrain_parser
from mirl.method_spec import flag_name
from mirl.methods import METHODS
from mirl.pretraining_method import PretrainingMethod

MIRL = Path(__file__).resolve().parent.parent / "mirl"
# the modules a method lives in (its network, its spec) and the registries that collect them
METHOD_MODULES = {"moco.py", "simclr.py", "byol.py", "dino.py", "methods.py", "models.py"}
METHOD_CLASSES = {"MoCo", "SimCLR", "BYOL", "DINO"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_option_is_a_flag_with_its_type_default_and_help(method):
    spec = METHODS[method]
    assert dataclasses.is_dataclass(spec.options_type) and spec.options_type.__dataclass_params__.frozen
    actions = {a.dest: a for a in pretrain_parser("rsna", method, Path("."))._actions}
    for option in dataclasses.fields(spec.options_type):
        action = actions[option.name]
        assert action.option_strings == [flag_name(option.name)] and action.default == option.default
        assert action.type is option.metadata["parse"] and action.help


def test_a_bad_option_value_is_one_line_before_any_work(rsna_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_entry(capsys, "RSNA_MoCo", "trainDINO.py", "--data-root", rsna_root, "--teacher-temp", "-1",
                  "--output-dir", tmp_path / "o")
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and "--teacher-temp" in lines[0]
    assert not (tmp_path / "o").exists()


def test_help_answers_without_importing_torch():
    probe = ("import runpy, sys\nsys.argv = ['trainDINO.py', '--help']\ntry:\n"
             "    runpy.run_path('trainDINO.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=script_folder("ISIC"), capture_output=True, text=True,
                            timeout=120)
    assert "--local-crops" in result.stdout and result.stderr.strip().endswith("no torch"), result.stderr


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_network_is_a_pretraining_method(method):
    module, _, builder = METHODS[method].builder.partition(":")
    assert issubclass(typing.get_type_hints(getattr(importlib.import_module(module), builder))["return"],
                      PretrainingMethod)


def test_nothing_outside_a_methods_module_asks_which_method_it_is():
    """No isinstance against a method's class, no import of one, no comparison with a method's name."""
    names = set(METHODS)
    found = []
    for path in sorted(MIRL.glob("*.py")):
        if path.name in METHOD_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and any(a.name in METHOD_CLASSES for a in node.names):
                found.append(f"{path.name}:{node.lineno} imports {[a.name for a in node.names]}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                classes = ast.dump(node.args[1]) if len(node.args) > 1 else ""
                if any(f"'{c}'" in classes for c in METHOD_CLASSES):
                    found.append(f"{path.name}:{node.lineno} isinstance")
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(value in names for value in constants):
                    found.append(f"{path.name}:{node.lineno} compares with a method's name")
    assert not found, found


def test_the_torch_free_choices_name_what_the_code_has():
    from mirl.augment import MODALITY_RECIPES
    from mirl.config import AUGMENT_STYLES
    from mirl.encoders import ENCODERS
    from mirl.flags import TORCHVISION_ENCODERS
    assert tuple(MODALITY_RECIPES) == AUGMENT_STYLES and tuple(ENCODERS) == TORCHVISION_ENCODERS
