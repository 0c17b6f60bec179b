"""Output folders (engram.experiments.outdir): one writer at a time, one experiment per folder, the
provenance of every invocation, and no worker left behind when its parent is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import engram
from engram.experiments import outdir
from engram.config import config_to_dict
from engram.errors import EngramError
from engram.experiments.outdir import OutputFolder
from engram.results import read_rows, row_key
from engram.experiments.continual import run_experiment
from engram.experiments.harness import resolve_device
from tests.conftest import tiny_config


def _engram(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "engram", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _measured(rows: list[dict]) -> list[tuple]:
    """Every row's key and value, without wall time (which differs between identical runs)."""
    return sorted(row_key(r) + (r["value"],) for r in rows if r["metric"] != "train_seconds")


def _wait_for_lock(out: Path, pid: int, process: subprocess.Popen, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if json.loads((out / outdir.LOCK_INFO).read_text())["pid"] == pid:
                return
        except (OSError, ValueError):
            pass
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.02)
    raise AssertionError(f"PID {pid} never locked {out}")


# ----------------------------------------------------------------------------- one writer

@pytest.mark.parametrize("command", [["run", "--resume"], ["sweep"]], ids=["run", "sweep"])
def test_a_second_writer_is_refused_and_no_row_is_lost_or_duplicated(tmp_path, command):
    """Two real processes on one folder at once: the second is refused with a message naming
    the first one's PID, and the folder ends up exactly as one uninterrupted run leaves it.
    (Before the lock, two `run --resume` wrote 2,040 duplicate rows, two sweeps 2,942.)"""
    cfg = tiny_config(methods=["naive", "replay"], seeds=[0, 1], data={"limit": 600},
                      train={"epochs": 12, "eval_every": 4})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    out = tmp_path / "out"
    first = _engram(command[0], str(config), "--out", str(out), *command[1:], "-q")
    _wait_for_lock(out, first.pid, first)
    # Pause the first writer while the second tries, so that on a loaded machine the first
    # cannot finish (and let go of the folder) before the second has even started.
    first.send_signal(signal.SIGSTOP)
    try:
        second = _engram(command[0], str(config), "--out", str(out), *command[1:], "-q")
        _, err = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert err.strip() == (err.strip().splitlines() or [""])[0], "a one-line message"
    assert f"{out} is in use: `engram {command[0]}` (PID {first.pid} on " in err
    assert "choose another --out" in err
    assert first.wait(180) == 0, first.stderr.read()

    clean = tmp_path / "clean"
    assert _engram(command[0], str(config), "--out", str(clean), "-q").wait(180) == 0
    rows = read_rows(out / "results.csv")
    assert len({row_key(r) for r in rows}) == len(rows), "duplicated rows"
    assert _measured(rows) == _measured(read_rows(clean / "results.csv"))
    assert not (out / outdir.LOCK_INFO).exists()


def test_blocks_nest_in_one_process_and_the_outermost_lets_go(tmp_path):
    """The CLI holds a folder through a whole command (the experiment function inside takes
    it again): the inner block must not refuse its own process, and the folder stays locked
    for other processes until the outer block ends (the summary and plots are drawn there)."""
    probe = [sys.executable, "-c", "from engram.experiments.outdir import OutputFolder\n"
             f"with OutputFolder({str(tmp_path / 'out')!r}, 'run'):\n    pass"]
    with OutputFolder(tmp_path / "out", "run"):
        with OutputFolder(tmp_path / "out", "run") as inner:
            inner.claim({"seeds": [0]})
        other = subprocess.run(probe, capture_output=True, text=True)
        assert other.returncode != 0 and f"PID {os.getpid()} " in other.stderr
    assert subprocess.run(probe, capture_output=True, text=True).returncode == 0


def test_a_refused_command_leaves_no_folder_behind(tmp_path):
    with pytest.raises(EngramError):
        with OutputFolder(tmp_path / "new", "run"):
            raise EngramError("refused before writing anything")
    assert not (tmp_path / "new").exists()


def test_the_lock_names_its_holder_and_a_dead_holder_blocks_nobody(tmp_path):
    with OutputFolder(tmp_path, "plasticity"):
        with pytest.raises(EngramError, match=rf"in use: `engram plasticity` \(PID {os.getpid()} "):
            with OutputFolder(tmp_path, "window"):
                pass
    # A holder killed with SIGKILL leaves its info file behind, but the OS lock dies with it.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engram.experiments.outdir import OutputFolder\n"
         f"with OutputFolder({str(tmp_path)!r}, 'run'):\n    print('locked', flush=True); "
         "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(EngramError, match=rf"PID {holder.pid} "):
        OutputFolder(tmp_path, "run").__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / outdir.LOCK_INFO).read_text())["pid"] == holder.pid
    with OutputFolder(tmp_path, "run"):
        assert json.loads((tmp_path / outdir.LOCK_INFO).read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------- one experiment

def test_run_resume_may_add_seeds_but_not_mix_experiments(tmp_path):
    run_experiment(tiny_config(), tmp_path, show_progress=False)
    run_experiment(tiny_config(seeds=[0, 1]), tmp_path, show_progress=False)
    rows = read_rows(tmp_path / "results.csv")
    assert sorted({r["seed"] for r in rows if r["metric"] == "run_complete"}) == ["0", "1"]
    record = json.loads((tmp_path / outdir.RECORD).read_text())
    assert record["command"] == "run" and record["identity"]["seeds"] == [0, 1]
    # a config listing only seed 1 is the same experiment too; the record keeps both seeds
    run_experiment(tiny_config(seeds=[1]), tmp_path, show_progress=False)
    assert json.loads((tmp_path / outdir.RECORD).read_text())["identity"]["seeds"] == [0, 1]
    with pytest.raises(EngramError, match=r"another experiment \(methods: .*; rerun with its "
                                          r"settings \(only seeds may grow\)"):
        run_experiment(tiny_config(methods=["ewc"]), tmp_path, show_progress=False)


def test_results_without_a_record_are_refused(tmp_path):
    """A folder of an older engram (or made by hand): nothing says which experiment its rows
    are, so --resume could merge another one into it (it did, when config.yaml was missing)."""
    (tmp_path / "results.csv").write_text("run_id,name\n")
    with pytest.raises(EngramError, match=r"holds results.csv but no experiment.json .*choose "
                                          "another --out, or move its results.csv away"):
        run_experiment(tiny_config(), tmp_path, show_progress=False)
    assert not (tmp_path / outdir.RECORD).exists() and not (tmp_path / "config.yaml").exists()


def _tiny_plasticity(**changes):
    from engram.schema import parse_dataclass
    from engram.experiments.plasticity import PlasticityConfig

    raw = {"seeds": [0], "problem": {"n_tasks": 2, "flip_every": 50, "probe_size": 10},
           "model": {"hidden": [4]}, **changes}
    return parse_dataclass(PlasticityConfig, raw)


def test_plasticity_refuses_a_changed_setting_and_may_add_seeds(tmp_path):
    """Rerun with another learning rate, plasticity used to skip every run as done and print
    the old learning rate's numbers."""
    from engram.experiments.plasticity import run_plasticity

    run_plasticity(_tiny_plasticity(), tmp_path, show_progress=False)
    faster = _tiny_plasticity(train={"epochs": 1, "batch_size": 1, "lr": 0.1})
    with pytest.raises(EngramError, match=r"another experiment \(train.lr: 0.01 there, 0.1 here"):
        run_plasticity(faster, tmp_path, show_progress=False)
    report = run_plasticity(_tiny_plasticity(seeds=[0, 1]), tmp_path, show_progress=False)
    assert (report.completed, report.skipped) == (1, 1)


def test_a_folder_of_another_command_is_refused(tmp_path):
    from engram.experiments.plasticity import run_plasticity
    from engram.experiments.window import parse_window_experiment, run_window_experiment

    run_plasticity(_tiny_plasticity(), tmp_path, show_progress=False)
    window = parse_window_experiment({"run": {"n_points": 20, "x_dim": 4, "y_dim": 2,
                                              "width": 4, "window": 5, "max_steps": 20}})
    with pytest.raises(EngramError, match=r"holds results of `engram plasticity`; `engram "
                                          r"window` writes a folder of its own"):
        run_window_experiment(window, tmp_path, show_progress=False)
    with pytest.raises(EngramError, match="holds results of `engram plasticity`"):
        run_experiment(tiny_config(), tmp_path, show_progress=False)


def test_window_may_add_seeds(tmp_path):
    from engram.experiments.window import parse_window_experiment, run_window_experiment

    raw = {"seeds": [0], "run": {"n_points": 20, "x_dim": 4, "y_dim": 2, "width": 4,
                                 "window": 5, "max_steps": 20}}
    run_window_experiment(parse_window_experiment(raw), tmp_path, show_progress=False)
    report = run_window_experiment(parse_window_experiment({**raw, "seeds": [0, 1]}), tmp_path,
                                   show_progress=False)
    assert (report.completed, report.skipped) == (1, 1)
    with pytest.raises(EngramError, match=r"another experiment \(variants: "):
        run_window_experiment(parse_window_experiment({**raw, "variants": [
            {"name": "plain", "weight_decay": 0.1}]}), tmp_path, show_progress=False)


SWEEP = {"name": "grid", "seeds": [0], "plots": False, "data": {"source": "digits", "limit": 300},
         "stream": {"kind": "split", "scenario": ["class"], "n_tasks": 2, "classes_per_task": 2},
         "model": {"kind": "mlp", "hidden": [16]}, "train": {"epochs": 1, "lr": 0.05},
         "methods": ["naive"]}


def test_a_sweep_may_grow_by_alternatives_but_a_changed_scalar_is_refused(tmp_path):
    """A sweep rerun with another single learning rate pooled both as one grid point ("2
    seeds" of two learning rates); an alternative added to an axis only runs what is new."""
    from engram.experiments.sweep import run_sweep

    def sweep(**changes):
        raw = json.loads(json.dumps(SWEEP))
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            raw[section][key] = value
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(raw))
        return run_sweep(path, tmp_path / "out", show_progress=False)

    sweep()
    report = sweep(stream__scenario=["class", "domain"])
    assert (report.total, report.skipped, report.completed) == (2, 1, 1)
    record = json.loads((tmp_path / "out" / outdir.RECORD).read_text())
    assert record["identity"]["stream.scenario"] == ["class", "domain"]
    with pytest.raises(EngramError, match=r"another experiment \(train.lr: 0.05 there, 0.01 "
                                          r"here\); .*only seeds, methods, stream.scenario may"):
        sweep(train__lr=0.01)
    with pytest.raises(EngramError, match=r"train.lr: 0.05 there, \[0.05, 0.01\] here"):
        sweep(train__lr=[0.05, 0.01])  # a new axis would rename the points already there


# ----------------------------------------------------------------------------- provenance

def test_every_invocation_appends_its_provenance(tmp_path):
    run_experiment(tiny_config(), tmp_path, show_progress=False)
    run_experiment(tiny_config(), tmp_path, show_progress=False)
    entries = [json.loads(line) for line in (tmp_path / outdir.PROVENANCE).read_text().splitlines()]
    assert len(entries) == 2
    import platform

    import torch
    for entry in entries:
        assert entry["command"] == "run" and entry["engram"] == engram.__version__
        assert entry["torch"] == torch.__version__
        assert entry["python"] == platform.python_version()
        assert entry["device"] == str(resolve_device("auto"))  # the config's device: auto
        assert entry["platform"] and entry["pid"] == os.getpid()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(outdir.__file__).parent,
                          capture_output=True, text=True)
    if head.returncode == 0:  # engram runs from a git checkout here: the commit is recorded
        assert entries[0]["git_commit"] == head.stdout.strip()
        assert isinstance(entries[0]["git_dirty"], bool)


def test_no_commit_is_claimed_outside_engrams_own_checkout(tmp_path, monkeypatch):
    """Installed into a venv inside some other git repository, the enclosing repository's
    commit is not engram's; outside any repository there is no commit at all."""
    package = tmp_path / "repo" / "site-packages" / "engram"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(outdir, "__file__", str(package / "outdir.py"))
    outdir._git_state.cache_clear()
    try:
        assert outdir._git_state() is None  # not a git checkout
        subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
        outdir._git_state.cache_clear()
        assert outdir._git_state() is None  # a repository, but engram is not tracked in it
        assert "git_commit" not in outdir.provenance("cpu")
    finally:
        outdir._git_state.cache_clear()


def _claimed(folder: Path, **identity) -> None:
    with OutputFolder(folder, "run") as out:
        out.claim({"seeds": [0], **identity})
    (folder / "results.csv").write_text("run_id\n")


def test_another_engram_version_is_refused_and_another_commit_warns(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(outdir, "_git_state", lambda: ("a" * 40, False))
    _claimed(tmp_path, lr=0.1)
    monkeypatch.setattr(outdir, "_git_state", lambda: ("b" * 40, True))
    with OutputFolder(tmp_path, "run") as out:
        out.claim({"seeds": [0], "lr": 0.1})
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"written at engram commit {'a' * 12} and this is {'b' * 12}" in err
    commits = [json.loads(line)["git_commit"]
               for line in (tmp_path / outdir.PROVENANCE).read_text().splitlines()]
    assert commits == ["a" * 40, "b" * 40]
    import engram.version

    monkeypatch.setattr(engram.version, "__version__", "99.0")  # what outdir records
    with pytest.raises(EngramError, match=r"written by engram 0\.1\.0 and this is engram 99\.0: "
                                          r"runs made by different code are not mixed"):
        with OutputFolder(tmp_path, "run") as out:
            out.claim({"seeds": [0], "lr": 0.1})


# ----------------------------------------------------------------------------- no orphans

def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] state, [19] start time."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _running(pid: int, started: str) -> bool:
    """The same process (its start time tells a reused PID apart), alive and not a zombie (an
    orphan's zombie may wait for a reaper that never comes)."""
    stat = _stat(pid)
    return bool(stat) and stat[19] == started and stat[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("command", ["plasticity", "window"])
def test_workers_exit_when_their_parent_is_killed(tmp_path, command):
    if command == "plasticity":
        config = tmp_path / "p.yaml"
        config.write_text(yaml.safe_dump({"seeds": [0, 1], "model": {"hidden": [4]},
                                          "problem": {"n_tasks": 1000, "flip_every": 1000}}))
        args = [str(config)]
    else:
        args = ["run.max_steps=10000000", "seeds=[0,1]", "--no-animation"]
    parent = _engram(command, *args, "--out", str(tmp_path / "out"), "--workers", "2")
    everyone: dict[int, str] = {}  # pid -> start time
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while time.monotonic() < deadline and len(workers) < 2:
            assert parent.poll() is None, parent.communicate()[1]
            workers = {pid for pid in _descendants(parent.pid)
                       if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}
            time.sleep(0.1)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(1.0)  # let them get into their runs
        # the workers, the progress queue's manager, multiprocessing's helpers
        everyone = {pid: stat[19] for pid in _descendants(parent.pid) if (stat := _stat(pid))}
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(*p) for p in everyone.items()):
            time.sleep(0.1)
        assert not [pid for pid in everyone.items() if _running(*pid)], "orphaned processes"
    finally:  # whatever happened, stop the processes this test started
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid, started in everyone.items():
            if _running(pid, started):
                os.kill(pid, signal.SIGKILL)
