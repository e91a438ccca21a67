"""The repository's shape: entry points are siblings (none imports another), and the flags they share have one home
(util/args.py): the sampler flags, the training defaults under a checkpoint's saved args and a tool's flags."""
import argparse
import ast
import os

import bench
import export
import sample
from util.args import SAMPLER_FIELDS, SAMPLING_METHODS, get_args_parser, given_flags, training_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = {"main_jit", "sample", "export", "bench", "prepare_data", "prepare_ref", "demo", "demo_text",
                "gpu_check"}


def imported_modules(path):
    """Top-level names of every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_entry_point_imports_another():
    """Every tool imports library modules only (util/, the model, the Denoiser, the engine), never another tool, and
    no library module imports a tool."""
    modules = sorted(name[:-3] for name in os.listdir(REPO) if name.endswith(".py"))
    assert ENTRY_POINTS <= set(modules)
    found = {name: imported_modules(os.path.join(REPO, f"{name}.py")) & ENTRY_POINTS - {name} for name in modules}
    util = os.path.join(REPO, "util")
    found.update({f"util/{name}": imported_modules(os.path.join(util, name)) & ENTRY_POINTS
                  for name in os.listdir(util) if name.endswith(".py")})
    assert {name: sorted(entry) for name, entry in found.items() if entry} == {}


def sampler_actions(parser):
    return {action.dest: action for action in parser._actions if action.dest in SAMPLER_FIELDS}


def test_sampler_flags_have_one_spelling():
    """main_jit.py, sample.py and export.py take the same sampler flags (util.args.add_sampler_flags): the same names,
    types, choices and help; main_jit.py's with its defaults, the other tools' unset (the checkpoint's values)."""
    parsers = {"main_jit": get_args_parser(), "sample": sample.get_args_parser(), "export": export.get_args_parser()}
    actions = {tool: sampler_actions(parser) for tool, parser in parsers.items()}
    for tool, found in actions.items():
        assert sorted(found) == sorted(SAMPLER_FIELDS), tool
        assert found["sampling_method"].choices == SAMPLING_METHODS, tool
        for name, action in found.items():
            reference = actions["main_jit"][name]
            assert (action.option_strings, action.type, action.help) == (
                reference.option_strings, reference.type, reference.help), (tool, name)
    assert {name: action.default for name, action in actions["main_jit"].items()} == {
        "sampling_method": "heun", "num_sampling_steps": 50, "cfg": 1.0, "interval_min": 0.0, "interval_max": 1.0}
    assert all(action.default is None for tool in ("sample", "export") for action in actions[tool].values())
    assert sampler_actions(bench.get_parser())["sampling_method"].choices == SAMPLING_METHODS


def test_settings_are_defaults_then_saved_args_then_flags():
    """training_args: main_jit.py's defaults, a checkpoint's saved args over them (a Namespace, or an export's dict),
    the flags given to a tool over those; a field an older checkpoint lacks keeps its default."""
    saved = argparse.Namespace(model="JiT-T/4", img_size=32, cfg=2.9, interval_min=0.1)  # an official file's args
    cli = sample.get_args_parser().parse_args(["--checkpoint", "x", "--cfg", "3.5", "--num_sampling_steps", "20"])
    args = training_args(saved, **given_flags(cli, SAMPLER_FIELDS))
    assert (args.model, args.img_size, args.cfg, args.interval_min, args.num_sampling_steps) == (
        "JiT-T/4", 32, 3.5, 0.1, 20)
    assert (args.sampling_method, args.class_num, args.attn_impl, args.eval_ema) == ("heun", 1000, "sdpa", 1)
    assert training_args({"cfg": 1.5}).cfg == 1.5 and training_args().cfg == 1.0
    assert given_flags(cli, SAMPLER_FIELDS) == {"cfg": 3.5, "num_sampling_steps": 20}
