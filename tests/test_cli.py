"""The `engram` command as a user meets it: help, list, run, errors, demo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from engram.cli import build_parser, main
from engram.config import config_to_dict
from engram.data import DATASETS, STREAMS
from engram.methods import METHODS
from engram.models import MODELS
from engram.reports.tables import summary_table
from engram.results import accuracy_matrices
from engram.results import read_rows
from tests.conftest import tiny_config

SUBCOMMANDS = ["demo", "run", "sweep", "table", "plot", "summary", "list", "profile", "profile-report", "plasticity",
               "window", "export"]


def test_every_subcommand_has_help(capsys):
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert len(capsys.readouterr().out) > 200
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMANDS)


EXPERIMENT_COMMANDS = ("demo", "run", "sweep", "profile", "plasticity", "window")


@pytest.mark.parametrize("command", EXPERIMENT_COMMANDS)
def test_every_experiment_command_takes_workers_and_quiet(command):
    """One harness, one set of options: --workers N (>= 1) and -q on every experiment."""
    parser = build_parser()
    positional = {"sweep": ["x.yaml"], "run": ["x.yaml"]}.get(command, [])
    args = parser.parse_args([command, *positional, "--workers", "3", "-q"])
    assert args.workers == 3 and args.quiet
    with pytest.raises(SystemExit):
        parser.parse_args([command, *positional, "--workers", "0"])


def test_a_failed_run_is_listed_with_its_seed_and_the_exit_status_is_1(tmp_path, capsys):
    """A diverging run does not stop the others; it is listed on stderr and in failures.jsonl."""
    cfg = config_to_dict(tiny_config(seeds=[0], methods=["naive", "ewc"]))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    status = main(["run", str(config), "--out", str(tmp_path / "out"), "-q",
                   "methods=[naive, {name: ewc, strength: 1.0e+300}]"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "1 of 2 runs failed" in err and "ewc(strength=1e+300) seed 0: DivergenceError" in err
    failures = (tmp_path / "out" / "failures.jsonl").read_text().splitlines()
    assert len(failures) == 1 and '"seed": 0' in failures[0]
    rows = read_rows(tmp_path / "out" / "results.csv")
    assert {r["method"] for r in rows if r["metric"] == "run_complete"} == {"naive"}


def test_runs_that_all_fail_before_training_list_why_and_draw_no_plots(tmp_path, capsys):
    """Missing data files fail every run at its start: the failures are listed (naming the
    file), not hidden behind an error about having nothing to plot."""
    cfg = config_to_dict(tiny_config(seeds=[0], plots=True,
                                     data={"source": "cifar10", "path": str(tmp_path / "nowhere")}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    status = main(["run", str(config), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "1 of 1 runs failed" in err and "nowhere: no such folder" in err
    assert "plot" not in err and not (tmp_path / "out" / "plots").exists()


def test_python_dash_m_engram_lists_every_registry_entry():
    out = subprocess.run([sys.executable, "-m", "engram", "list"], capture_output=True, text=True,
                         check=True).stdout
    from engram.importance.measures import MEASURES
    from engram.registry import PROBLEMS

    lines = out.strip().splitlines()
    registries = (DATASETS, STREAMS, MODELS, METHODS, MEASURES, PROBLEMS)
    assert [line for line in lines if not line.startswith(" ")] == \
        [f"{r.kind}s:" for r in registries]
    entries = [line.strip() for line in lines if line.startswith(" ")]
    assert [e.split(" ", 1)[0] for e in entries] == [n for r in registries for n in r.names()]
    assert all(len(e.split(" ", 1)) == 2 and e.split(" ", 1)[1].strip() for e in entries)


def test_help_does_not_import_torch():
    code = "import sys; from engram.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n" \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_run_writes_results_table_and_plots(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    cfg = tiny_config(methods=["naive", "replay"], plots=True)
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    out = tmp_path / "run"
    assert main(["run", str(config), "seeds=[0,1]", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "avg accuracy" in printed and "replay" in printed and "±" in printed
    assert {m.seed for m in accuracy_matrices(read_rows(out / "results.csv"))} == {0, 1}
    assert sorted(p.name for p in (out / "plots").glob("*.png"))
    assert main(["summary", str(out)]) == 0
    assert "naive" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["run", "no/such.yaml"], "config file no/such.yaml does not exist"),
    (["summary", "no/such/dir"], "no/such/dir/results.csv does not exist"),
])
def test_user_errors_print_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error:") and message in err and "Traceback" not in err


def test_bad_config_key_is_reported_before_training(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epoch: 3\n")
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key train.epoch" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_config_lists_keys(capsys):
    assert main(["run", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("train.epochs", "stream.scenario", "data.path", "seeds", "checkpoint_seconds"):
        assert key in out


@pytest.mark.slow
def test_demo_shows_forgetting_replay_and_joint(tmp_path):
    """The demo's claims: naive ~0.2, replay far above it, joint >= 0.9 (3 seeds each)."""
    result = subprocess.run([sys.executable, "-m", "engram", "demo", "--out", str(tmp_path), "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = {e["label"]: e for e in summary_table(read_rows(tmp_path / "results.csv"))}
    assert set(table) == {"naive", "ewc", "replay", "joint"}
    accuracy = {label: e["average_accuracy"][0] for label, e in table.items()}
    assert 0.15 <= accuracy["naive"] <= 0.25
    assert accuracy["replay"] >= accuracy["naive"] + 0.4
    assert accuracy["joint"] >= 0.9
    assert all(e["n_seeds"] == 3 for e in table.values())
    assert (tmp_path / "plots" / "comparison.png").exists()


def test_run_without_a_config_says_what_is_missing():
    with pytest.raises(SystemExit, match="a CONFIG file is required"):
        main(["run"])
