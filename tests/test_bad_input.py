"""Every bad input gets a one-line `engram: error: ...` and exit status 2, never a traceback;
and a config's name can never send output outside runs/."""

from __future__ import annotations

import csv
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engram import cli
from engram.cli import main
from engram.config import config_to_dict, load_config, load_config_dict
from engram.experiments.continual import continual_run_id as run_id
from engram.errors import ConfigError
from engram.results import COLUMNS
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
MAX_CONFIG_DEPTH = 50  # engram.config.MAX_CONFIG_DEPTH, as the README states it
TINY_WINDOW = ["run.max_steps=60", "run.n_points=20", "run.window=5", "run.record_every=10"]


def fails_with(capsys, args: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with one `engram: error:` line holding every needle."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def run_fails_with(capsys, args: list[str], *needles: str) -> str:
    """Run an experiment command whose run fails: exit 1, the failed run listed on stderr with
    every needle, no traceback (the harness's failure report, the same for every command)."""
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "runs failed" in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# One command per config schema: each reads its YAML through engram.config.read_yaml_file.
COMMANDS = ["run", "sweep", "profile", "plasticity", "window"]


def command(kind: str, config: str, tmp_path: Path) -> list[str]:
    return [kind, config, "--out", str(tmp_path / "out")]


# ----------------------------------------------------------------------------- YAML files

@pytest.mark.parametrize("kind", COMMANDS)
def test_non_utf8_config_names_the_file_and_line(tmp_path, capsys, kind):
    config = write(tmp_path, b"seeds: [0]\nname: caf\xe9\n")
    fails_with(capsys, command(kind, config, tmp_path), config, "is not UTF-8 text",
               "byte 0xe9 on line 2")


@pytest.mark.parametrize("kind", COMMANDS)
def test_empty_config_is_refused(tmp_path, capsys, kind):
    config = write(tmp_path, "# only a comment\n")
    fails_with(capsys, command(kind, config, tmp_path), f"config file {config} is empty"
               if kind != "sweep" else f"sweep file {config} is empty")


def test_no_config_at_all_still_means_the_defaults():
    from engram.experiments.window import load_window_experiment

    assert load_window_experiment(None, ["run.max_steps=10"]).run.max_steps == 10


def _alias_bomb(levels: int = 9) -> str:
    """Nine levels of nine aliases: 9**9 (387 million) strings once expanded."""
    lines = ["seeds:", "  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", COMMANDS)
def test_alias_bomb_is_refused_at_once(tmp_path, capsys, kind):
    config = write(tmp_path, _alias_bomb())
    started = time.perf_counter()
    err = fails_with(capsys, command(kind, config, tmp_path), "is not valid YAML",
                     "more than 100,000 values")
    assert time.perf_counter() - started < 10  # was 62 s and 2.5 GB, then MemoryError
    assert len(err) < 300


def test_alias_bomb_in_an_override_is_refused_too(tmp_path, capsys):
    config = write(tmp_path, "seeds: [0]\n")
    bomb = "[" + ",".join(["&a{i} [x,x,x,x,x,x,x,x,x,x]"] + ["*a{i}"] * 20) + "]"
    nested = "{" + ", ".join(f"k{i}: " + bomb.format(i=i) for i in range(600)) + "}"
    fails_with(capsys, ["run", config, f"data={nested}"], "is not valid YAML",
               "more than 100,000 values")


def test_a_few_aliases_still_work(tmp_path):
    config = write(tmp_path, "model: {hidden: &h [8]}\ntrain: {epochs: 1}\n"
                             "methods: [naive, {name: ewc, strength: &s 10}, "
                             "{name: l2_init, strength: *s}]\n")
    cfg = load_config(config)
    assert cfg.methods[2].params.strength == 10.0


def test_oversized_config_is_refused_before_it_is_read(tmp_path, capsys):
    config = write(tmp_path, "seeds: [0]\n# " + "x" * 1_100_000 + "\n")
    fails_with(capsys, ["run", config], "bytes; a config may have at most 1,000,000")


@pytest.mark.parametrize("text", ["seeds: " + "[" * 5000 + "]" * 5000,
                                  "data: " + "{a: " * 5000 + "1" + "}" * 5000,
                                  "data: " + "[" * (MAX_CONFIG_DEPTH + 1) + "]" *
                                  (MAX_CONFIG_DEPTH + 1)])
def test_deep_nesting_is_refused(tmp_path, capsys, text):
    config = write(tmp_path, text + "\n")
    fails_with(capsys, ["run", config], "is not valid YAML",
               f"nested more than {MAX_CONFIG_DEPTH} levels deep")


def test_deep_override_path_is_refused():
    with pytest.raises(ConfigError, match="more than 50 levels"):
        load_config_dict({}, ["name." + ".".join(["a"] * 5000) + "=1"])


def test_a_list_that_contains_itself_is_refused(tmp_path, capsys):
    config = write(tmp_path, "seeds: &a [0, *a]\n")
    fails_with(capsys, ["run", config], "an alias refers to a value that contains it")


@pytest.mark.parametrize("kind", COMMANDS)
def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path, capsys, kind):
    config = write(tmp_path, "seeds: [0]\nname: first\n\nname: second\n")
    fails_with(capsys, command(kind, config, tmp_path),
               "duplicate key 'name', first on line 2 (line 4, column 1)")


def test_duplicate_keys_inside_a_section_too(tmp_path, capsys):
    config = write(tmp_path, "train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.5\n")
    fails_with(capsys, ["run", config], "duplicate key 'lr', first on line 2 (line 4")


def test_yaml_syntax_errors_are_one_line(tmp_path, capsys):
    config = write(tmp_path, "train:\n  epochs: [1, 2\n")
    fails_with(capsys, ["run", config], "is not valid YAML", "(line ")


def test_huge_values_are_not_echoed_in_full(tmp_path, capsys):
    config = write(tmp_path, "name: [" + ", ".join(["abcdefgh"] * 50_000) + "]\n"
                             "data: {source: " + "z" * 200_000 + "}\n")
    err = fails_with(capsys, ["run", config], "name: expected a string, got ['abcdefgh'")
    assert len(err) < 300
    with pytest.raises(ConfigError) as info:
        load_config_dict({"data": {"source": "z" * 200_000}})
    assert "unknown dataset 'zzz" in str(info.value) and len(str(info.value)) < 500
    from engram.experiments.window import parse_window_experiment

    with pytest.raises(ConfigError) as info:
        parse_window_experiment({"variants": [{"name": list(range(100_000))}]})
    assert "variants[0].name: '[0, 1, 2" in str(info.value) and len(str(info.value)) < 300


# ----------------------------------------------------------------------------- values

SCHEMAS = {  # command -> a minimal valid config of its schema
    "run": "seeds: [0]\n",
    "profile": "seeds: [0]\n",
    "plasticity": "seeds: [0]\n",
    "window": "seeds: [0]\n",
}


@pytest.mark.parametrize("kind", SCHEMAS)
@pytest.mark.parametrize("seeds, shown", [(f"[{2**70}]", str(2**70)), ("[0, -1]", "-1"),
                                          (f"[{2**63}]", str(2**63))])
def test_seeds_outside_torch_range_are_refused(tmp_path, capsys, kind, seeds, shown):
    config = write(tmp_path, f"seeds: {seeds}\n")
    fails_with(capsys, command(kind, config, tmp_path),
               f"seeds: {shown} is out of range; a seed is a whole number from 0 to 2**63 - 1")


def test_largest_seed_is_accepted_and_runs():
    cfg = tiny_config(seeds=[2**63 - 1], stream={"n_tasks": 1}, train={"epochs": 1})
    assert cfg.seeds == [2**63 - 1]
    torch.manual_seed(cfg.seeds[0])
    torch.Generator().manual_seed(cfg.seeds[0] + 1_000_003)  # the plasticity runner's offset


@pytest.mark.parametrize("kind", ["run", "profile", "plasticity"])
@pytest.mark.parametrize("device", ["meta", "xyz", "cuda:x", "cpu:0"])
def test_devices_engram_cannot_train_on_are_refused(tmp_path, capsys, kind, device):
    config = write(tmp_path, f"seeds: [0]\ndevice: '{device}'\n")
    fails_with(capsys, command(kind, config, tmp_path),
               f"device: '{device}' is not a device; use auto, cpu, cuda or cuda:N")
    assert not (tmp_path / "out").exists()


def test_resolve_device_refuses_meta_and_missing_gpus():
    from engram.experiments.harness import resolve_device

    with pytest.raises(ConfigError, match="'meta' is not a device"):
        resolve_device("meta")
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("kind", SCHEMAS)
@pytest.mark.parametrize("name", ["/abs/path", "../..", "..", ".", "a/b", "", "a b", "..\\\\x"])
def test_names_that_could_escape_runs_are_refused(tmp_path, capsys, kind, name):
    config = write(tmp_path, f"seeds: [0]\nname: '{name}'\n")
    fails_with(capsys, command(kind, config, tmp_path)[:2],  # no --out: runs/<name>
               "name: ", "is not a plain name; use letters, digits and . _ - only")


@pytest.mark.parametrize("name", ["run", "split_digits-v2.1", "a..b"])
def test_plain_names_are_accepted(name):
    assert tiny_config(name=name).name == name


def test_shipped_configs_have_plain_names():
    from engram.config import check_name

    for path in list((REPO / "configs").rglob("*.yaml")) + [cli.DEMO_CONFIG]:
        check_name(yaml.safe_load(path.read_text())["name"], f"{path}: name")


# ----------------------------------------------------------------------------- files engram reads

def test_checkpoint_of_the_wrong_structure_names_the_file(tmp_path, capsys):
    cfg = tiny_config()
    config = write(tmp_path, yaml.safe_dump(config_to_dict(cfg)))
    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / f"{run_id(cfg, cfg.methods[0], 0)}.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"a": 1}, checkpoint)
    run_fails_with(capsys, ["run", config, "--out", str(out), "-q"],
                   f"checkpoint {checkpoint} cannot be read", "'model' is missing",
                   "delete it to restart this run")
    torch.save([1, 2], checkpoint)
    run_fails_with(capsys, ["run", config, "--out", str(out), "-q"],
                   "it holds a list, not an engram checkpoint")
    checkpoint.unlink()  # as the message says: the run then starts over and finishes
    assert main(["run", config, "--out", str(out), "--resume", "-q"]) == 0


def _results_csv(folder: Path, bad: dict[str, str] | None = None, raw: bytes = b"") -> Path:
    """A tiny results.csv in `folder` of the continual-learning table, one row `bad`-ed."""
    folder.mkdir(parents=True, exist_ok=True)
    row = dict(run_id="r1", name="n", seed="0", method="naive", label="naive", params="{}",
               dataset="digits", stream="split", scenario="class", task_trained="1",
               epoch="1", step="10", task_eval="1", split="test", metric="accuracy",
               value="0.5")
    path = folder / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerow(row)
        writer.writerow({**row, **(bad or {})})
    with open(path, "ab") as f:
        f.write(raw)
    return path


@pytest.mark.parametrize("bad, message", [
    ({"seed": "abc"}, "line 3, column seed: 'abc' is not an integer"),
    ({"value": "x"}, "line 3, column value: 'x' is not a number"),
    ({"task_trained": "1.5"}, "line 3, column task_trained: '1.5' is not an integer"),
    ({"step": ""}, "line 3, column step: '' is not an integer"),
    ({"task_eval": ""}, "line 3, column task_eval: '' is not an integer"),  # an accuracy row
])
@pytest.mark.parametrize("kind", ["summary", "table", "plot"])
def test_non_numbers_in_results_name_file_line_and_column(tmp_path, capsys, bad, message, kind):
    path = _results_csv(tmp_path / "run", bad)
    fails_with(capsys, [kind, str(tmp_path / "run")], f"{path}, {message}")


@pytest.mark.parametrize("kind", ["summary", "table", "plot"])
def test_non_utf8_byte_in_results_names_file_line_and_column(tmp_path, capsys, kind):
    path = _results_csv(tmp_path / "run", {"label": "caf\N{LATIN SMALL LETTER E WITH ACUTE}"})
    path.write_bytes(path.read_bytes().replace("é".encode(), b"\xe9"))
    fails_with(capsys, [kind, str(tmp_path / "run")],
               f"{path}, line 3, column label: byte 0xe9 is not UTF-8 text")


def test_a_row_with_missing_fields_is_named(tmp_path, capsys):
    path = _results_csv(tmp_path / "run", raw=b"r1,n,0\n")
    fails_with(capsys, ["summary", str(tmp_path / "run")],
               f"{path}, line 4: the row has fewer fields than the header's 16")


def test_resume_reads_results_through_the_same_checks(tmp_path, capsys):
    config = write(tmp_path, yaml.safe_dump(config_to_dict(tiny_config())))
    assert main(["run", config, "--out", str(tmp_path / "out"), "-q"]) == 0  # a real folder
    capsys.readouterr()
    path = tmp_path / "out" / "results.csv"
    lines = path.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    cells = lines[2].rstrip("\n").split(",")
    cells[header.index("seed")] = "abc"
    lines[2] = ",".join(cells) + "\n"
    path.write_text("".join(lines))
    fails_with(capsys, ["run", config, "--out", str(tmp_path / "out"), "--resume", "-q"],
               f"{path}, line 3, column seed: 'abc' is not an integer")


def test_profile_report_checks_its_numbers(tmp_path, capsys):
    from engram.experiments.profile import PROFILE_COLUMNS

    row = dict(profile_id="p", name="n", seed="0", epoch="2", measure="random",
               aggregation="weight", reducer="mean", scope="layer", direction="least_first",
               threshold="0.5", fraction_replaced="0.5", train_loss="1", val_loss="oops",
               val_accuracy="0.5", n_classes="10")
    (tmp_path / "p").mkdir()
    with open(tmp_path / "p" / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, PROFILE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerow(row)
    fails_with(capsys, ["profile-report", str(tmp_path / "p"), "--no-png"],
               "results.csv, line 2, column val_loss: 'oops' is not a number")


def _plain_window(tmp_path: Path) -> tuple[Path, Path]:
    from engram.experiments.window import load_window_experiment, record_path, run_window_experiment

    experiment = load_window_experiment(None, TINY_WINDOW)
    out = tmp_path / "w"
    run_window_experiment(experiment, out, show_progress=False)
    return out, record_path(out, experiment.variants[0], 0)


@pytest.mark.parametrize("damage", ["truncate", "wrong_arrays", "wrong_shapes", "not_a_zip"])
def test_corrupt_window_record_names_the_file_and_the_remedy(tmp_path, capsys, damage):
    out, npz = _plain_window(tmp_path)
    if damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:300])
    elif damage == "wrong_arrays":
        np.savez(npz, a=np.arange(3))
    elif damage == "wrong_shapes":
        with np.load(npz) as z:
            arrays = dict(z)
        np.savez(npz, **{**arrays, "steps": arrays["steps"][:-1]})
    else:
        npz.write_bytes(b"hello, not a zip file")
    args = ["window", *TINY_WINDOW, "--out", str(out), "--no-animation", "-q"]
    fails_with(capsys, args, f"{npz} is not a readable window record",
               "delete it to rerun that run")
    npz.unlink()  # the remedy the message gives: the run is measured again
    assert main(args) == 0 and npz.is_file()


# ----------------------------------------------------------------------------- files engram writes

def test_out_under_a_regular_file(tmp_path, capsys):
    config = write(tmp_path, yaml.safe_dump(config_to_dict(tiny_config())))
    (tmp_path / "afile").write_text("x")
    fails_with(capsys, ["run", config, "--out", str(tmp_path / "afile" / "x"), "-q"],
               f"cannot access {tmp_path / 'afile' / 'x'}", "Not a directory")


def test_out_with_an_over_long_name(tmp_path, capsys):
    config = write(tmp_path, yaml.safe_dump(config_to_dict(tiny_config())))
    fails_with(capsys, ["window", *TINY_WINDOW, "--out", str(tmp_path / ("a" * 300)), "-q"],
               "cannot access ", "File name too long")
    fails_with(capsys, ["run", config, "--out", str(tmp_path / ("a" * 300)), "-q"],
               "File name too long")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions, which root ignores")
def test_read_only_out(tmp_path, capsys):
    config = write(tmp_path, yaml.safe_dump(config_to_dict(tiny_config())))
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        fails_with(capsys, ["run", config, "--out", str(tmp_path / "ro" / "x"), "-q"],
                   f"cannot access {tmp_path / 'ro' / 'x'}", "Permission denied")
    finally:
        (tmp_path / "ro").chmod(0o755)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_full_disk_names_the_file(tmp_path, capsys):
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    config = write(tmp_path, yaml.safe_dump(config_to_dict(tiny_config())))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.csv").symlink_to("/dev/full")
    fails_with(capsys, ["run", config, "--out", str(tmp_path / "out"), "-q"],
               f"cannot access {tmp_path / 'out' / 'results.csv'}: No space left on device")


def test_bugs_still_show_their_traceback(monkeypatch):
    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "list", broken)
    with pytest.raises(ZeroDivisionError):
        main(["list"])


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("args", [["demo", "--seeds", "0"], ["demo", "--seeds", "-2"],
                                  ["sweep", "x.yaml", "--workers", "0"],
                                  ["plasticity", "x.yaml", "--workers", "0"],
                                  ["window", "--workers", "0"],
                                  ["window", "--workers", "-1"]])
def test_counts_below_one_are_refused_by_the_parser(capsys, args):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    option = args[-2]
    assert f"argument {option}: must be at least 1, got {int(args[-1])}" in capsys.readouterr().err


def test_every_config_named_in_the_help_exists():
    """Each `configs/....yaml` the help texts mention is in the repository (placeholders
    such as configs/X.yaml aside), and `engram run`'s examples are run configs."""
    source = Path(cli.__file__).read_text()
    named = set(re.findall(r"configs/[\w/.-]+?\.yaml", source))
    placeholders = {n for n in named if re.fullmatch(r"configs/[A-Z]+\.yaml", n)}
    assert len(named - placeholders) >= 5
    for name in sorted(named - placeholders):
        assert (REPO / name).is_file(), f"{name} is mentioned in engram's help but missing"
    for name in set(re.findall(r"engram run (configs/\S+\.yaml)", cli.RUN_EPILOG)):
        load_config(REPO / name)
