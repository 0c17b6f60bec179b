"""Plugins (engram.plugins): a user's module registering a method and a model body, used from
YAML through `engram run|sweep|list --import`, by spawned workers and Ray tasks (which must
import it before they unpickle a job holding the plugin's Params), by a dotted name, and as
an installed distribution's `engram.plugins` entry point; a broken plugin is one line.
The Ray run is in tests/test_ray_backend.py, on that module's Ray instance."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import yaml

from engram import plugins
from engram.cli import build_parser, main
from engram.errors import ConfigError
from engram.registry import DATASETS, MEASURES, METHODS, MODELS, PROBLEMS, STREAMS
from engram.results import read_rows
from tests.test_sweep import TINY

PLUGIN = textwrap.dedent('''
    """A test plugin: an L2-to-zero penalty method and a one-layer tanh body."""
    import math
    import os
    from dataclasses import dataclass
    from pathlib import Path

    from torch import nn

    from engram.methods.base import Method
    from engram.registry import METHODS, MODELS
    from engram.schema import opt


    @dataclass
    class ZeroParams:
        strength: float = opt(0.01, "weight of ||theta||^2", low=0.0)


    class L2Zero(Method):
        """Pull every weight to zero; notes which process ran it (PIDS_FILE)."""
        Params = ZeroParams

        def prepare_model(self, model, ctx):
            with open(Path(__file__).with_name("pids.txt"), "a") as f:
                f.write(f"{os.getpid()}\\n")
            return model

        def penalty(self, ctx):
            return self.params.strength * sum(p.pow(2).sum() for p in ctx.model.parameters())


    def tanh_body(input_shape, cfg):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 8), nn.Tanh()), 8


    METHODS.add("l2zero", L2Zero, "L2 penalty pulling every weight to zero (a test plugin)")
    MODELS.add("tanhbody", tanh_body, "one tanh layer of width 8 (a test plugin)")
''')


@pytest.fixture(autouse=True)
def clean_registries(monkeypatch):
    """Each test starts from engram's own registrations and forgets the plugins it loaded."""
    for registry in (DATASETS, STREAMS, PROBLEMS, MODELS, METHODS, MEASURES):
        registry.names()  # filled by its home module first, so the copy is complete
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.setattr(plugins, "_loaded", {})
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("myplugin", "labparts", "broken", "epplugin")):
            del sys.modules[name]


def write_plugin(folder, name="myplugin.py"):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PLUGIN)
    return path


def write_config(tmp_path, name="cfg.yaml", **changes):
    raw = {**TINY, "model": {"kind": "tanhbody"}, "methods": [{"name": "l2zero", "strength": 0.1}],
           **changes}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def pids(plugin_path):
    return set((plugin_path.parent / "pids.txt").read_text().split())


@pytest.mark.parametrize("command", ["demo", "run", "sweep", "profile", "plasticity", "window",
                                     "list"])
def test_every_command_that_reads_a_config_or_lists_takes_import_repeatedly(command):
    positional = {"sweep": ["x.yaml"], "run": ["x.yaml"]}.get(command, [])
    args = build_parser().parse_args([command, *positional, "--import", "a.b", "--import",
                                      "c.py"])
    assert args.imports == ["a.b", "c.py"]


def test_run_with_a_plugin_file(tmp_path):
    plugin = write_plugin(tmp_path / "lab")
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path)), "--import", str(plugin), "--out", str(out),
                 "-q"]) == 0
    rows = read_rows(out / "results.csv")
    assert {r["method"] for r in rows} == {"l2zero"}
    assert any(r["metric"] == "run_complete" for r in rows)
    assert pids(plugin) == {str(os.getpid())}  # one worker: it ran here


def test_a_two_worker_sweep_imports_the_plugin_in_each_worker(tmp_path):
    plugin = write_plugin(tmp_path / "lab")
    grid = write_config(tmp_path, "grid.yaml",
                        methods=[{"name": "l2zero", "strength": [0.0, 0.5]}])
    out = tmp_path / "out"
    assert main(["sweep", str(grid), "--import", str(plugin), "--workers", "2", "--out",
                 str(out), "-q"]) == 0
    rows = read_rows(out / "results.csv")
    done = {r["run_id"] for r in rows if r["metric"] == "run_complete"}
    assert len(done) == 2 and {r["method"] for r in rows} == {"l2zero"}
    assert not (out / "failures.jsonl").exists()
    ran_in = pids(plugin)
    assert len(ran_in) == 2 and str(os.getpid()) not in ran_in  # each job in a spawned worker


def test_a_dotted_module_name_on_the_python_path_reaches_the_workers(tmp_path, monkeypatch):
    plugin = write_plugin(tmp_path / "path" / "labparts", "plugin.py")
    (plugin.parent / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "path"))  # spawned workers get this sys.path
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path, seeds=[0, 1])), "--import", "labparts.plugin",
                 "--workers", "2", "--out", str(out), "-q"]) == 0
    assert len({r["run_id"] for r in read_rows(out / "results.csv")}) == 2
    assert str(os.getpid()) not in pids(plugin)


def test_list_shows_the_plugins_entries_and_run_ids_do_not_depend_on_it(tmp_path, capsys):
    plugin = write_plugin(tmp_path / "lab")
    assert main(["list", "--params", "--import", str(plugin)]) == 0
    listed = capsys.readouterr().out
    assert "  l2zero L2 penalty pulling every weight to zero (a test plugin)" in listed
    assert "  tanhbody one tanh layer of width 8 (a test plugin)" in listed
    assert "strength = 0.01: weight of ||theta||^2" in listed
    assert "  ewc " in listed  # engram's own entries are still there

    grid = write_config(tmp_path, model={"kind": "mlp", "hidden": [8]}, methods=["naive"])
    assert main(["sweep", str(grid), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    without = capsys.readouterr().out
    assert main(["sweep", str(grid), "--dry-run", "--import", str(plugin), "--out",
                 str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out == without


def test_a_plugin_used_without_import_is_an_unknown_name(tmp_path, capsys):
    assert main(["run", str(write_config(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    assert "l2zero" in capsys.readouterr().err


@pytest.mark.parametrize("module, expected", [
    ("BROKEN_FILE", "broken.py: cannot import it (RuntimeError: no GPU driver here)"),
    ("no_such_module_xyz", "--import no_such_module_xyz: cannot import it "
                           "(ModuleNotFoundError: No module named 'no_such_module_xyz')"),
    ("missing/plugin.py", "missing/plugin.py: no such file"),
])
def test_a_plugin_that_fails_to_import_is_one_line_and_exit_2(tmp_path, capsys, module,
                                                               expected):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no GPU driver here')\n")
    module = str(broken) if module == "BROKEN_FILE" else module
    assert main(["list", "--import", module]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1


def test_a_method_registered_twice_is_one_line(tmp_path, capsys):
    first, second = write_plugin(tmp_path / "a"), write_plugin(tmp_path / "b", "myplugin2.py")
    assert main(["list", "--import", str(first), "--import", str(second)]) == 2
    err = capsys.readouterr().err.strip()
    assert "myplugin2.py: cannot import it (ValueError: method 'l2zero' is registered twice)" \
        in err and len(err.splitlines()) == 1


def test_load_plugins_is_idempotent_and_names_files_by_absolute_path(tmp_path, monkeypatch):
    plugin = write_plugin(tmp_path / "lab")
    monkeypatch.chdir(tmp_path)
    assert plugins.load_plugins(["lab/myplugin.py"]) == [str(plugin.resolve())]
    assert plugins.load_plugins([str(plugin), "lab/myplugin.py"]) == [str(plugin.resolve())] * 2
    assert "l2zero" in METHODS  # registered once: a second import would raise "twice"
    with pytest.raises(ConfigError, match="'myplugin' is already imported"):
        plugins.load_plugins([str(write_plugin(tmp_path / "other"))])


def test_an_installed_entry_point_is_loaded_at_cli_start(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    write_plugin(site, "epplugin.py")
    info = site / "myplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[engram.plugins]\nmyplug = epplugin\n")
    monkeypatch.syspath_prepend(str(site))
    assert main(["list"]) == 0
    assert "  l2zero L2 penalty" in capsys.readouterr().out
    assert plugins.entry_point_plugins() == ["epplugin"]  # the name a worker imports

    (info / "entry_points.txt").write_text("[engram.plugins]\nmyplug = epplugin_missing\n")
    assert main(["list"]) == 2  # before the command runs: one line naming it
    err = capsys.readouterr().err.strip()
    assert "entry point myplug = epplugin_missing (group engram.plugins): cannot import it" \
        in err and len(err.splitlines()) == 1

