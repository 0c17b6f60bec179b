"""Results you can query (engram.frames): every table engram writes as a typed DataFrame, its
Parquet export, the accuracy matrix per run, and `engram summary`/`plot` over several folders.

The folders are real ones, written by the tiniest configs each experiment's own tests use."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

import engram  # noqa: E402
from engram.cli import main  # noqa: E402
from engram.errors import DataError, EngramError  # noqa: E402
from engram.results import NUMERIC_COLUMNS, TABLES, read_rows  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def continual_folder(folder, name, lr):
    from engram.experiments.continual import run_experiment

    cfg = tiny_config(name=name, seeds=[0, 1], train={"lr": lr})
    run_experiment(cfg, folder, show_progress=False)
    return folder


def profile_folder(folder):
    from engram.experiments.profile import run_profile
    from tests.test_profile import tiny

    run_profile(tiny(seeds=[0], profile={"aggregations": ["weight"]}), folder, show_progress=False)
    return folder


def plasticity_folder(folder):
    from engram.experiments.plasticity import run_plasticity
    from tests.test_plasticity import tiny

    run_plasticity(tiny(seeds=[0]), folder, show_progress=False)
    return folder


def window_folder(folder):
    from engram.experiments.window import parse_window_experiment, run_window_experiment
    from tests.test_window import _tiny_experiment_raw

    raw = {**_tiny_experiment_raw(), "seeds": [0], "variants": ["plain"]}
    run_window_experiment(parse_window_experiment(raw), folder, show_progress=False)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> a folder holding that kind of results table; 'other' is a second continual
    experiment (another name and learning rate: other runs), to join with the first."""
    root = tmp_path_factory.mktemp("frames")
    return {"continual": continual_folder(root / "continual", "first", 0.05),
            "other": continual_folder(root / "other", "second", 0.1),
            "profile": profile_folder(root / "profile"),
            "plasticity": plasticity_folder(root / "plasticity"),
            "window": window_folder(root / "window")}


KINDS = ["continual", "profile", "plasticity", "window"]


def expected_dtype(kind: str, column: str) -> str:
    numeric = NUMERIC_COLUMNS.get(column)
    if numeric is float:
        return "float64"
    if numeric is int:
        return "Int64" if column in TABLES[kind].nullable else "int64"
    return "string"


def converted(kind: str, column: str, cell: str):
    """read_rows' string as the frame should hold it: None for an empty cell."""
    if cell == "" and NUMERIC_COLUMNS.get(column) is not None:
        return None
    return {"float64": float, "int64": int, "Int64": int, "string": str}[
        expected_dtype(kind, column)](cell)


def plain(value):
    """A frame's cell as a Python value (pandas.NA -> None) for comparison."""
    return None if value is pd.NA else value


@pytest.mark.parametrize("kind", KINDS)
def test_every_table_loads_with_its_types_and_read_rows_values(folders, kind):
    folder = folders[kind]
    rows = read_rows(folder / "results.csv", TABLES[kind].columns, TABLES[kind].key)
    frame = engram.load_results(folder)
    assert list(frame.columns) == TABLES[kind].columns
    assert len(frame) == len(rows) > 0
    assert {c: str(t) for c, t in frame.dtypes.items()} == \
        {c: expected_dtype(kind, c) for c in TABLES[kind].columns}
    for column in frame.columns:
        assert [plain(v) for v in frame[column].tolist()] == \
            [converted(kind, column, row[column]) for row in rows], column
    # a nullable column really has empty cells in these tables: the reason it is nullable
    for column in TABLES[kind].nullable:
        assert frame[column].isna().any() and frame[column].notna().any()
    # the same frame from the file itself
    pd.testing.assert_frame_equal(engram.load_results(folder / "results.csv"), frame)


@pytest.mark.parametrize("kind", KINDS)
def test_the_fast_reader_takes_clean_files_and_gives_the_careful_readers_frame(folders, kind,
                                                                              tmp_path):
    from engram.frames import cells_read_fast, frame_of_cells

    table, path = TABLES[kind], folders[kind] / "results.csv"
    cells = cells_read_fast(path, table)
    assert cells is not None  # a clean file does not fall back: the fast path is tested here
    rows = read_rows(path, table.columns, table.key)
    careful = frame_of_cells({c: np.array([r[c] for r in rows], dtype=object)
                              for c in table.columns}, table)
    pd.testing.assert_frame_equal(frame_of_cells(cells, table), careful)
    # a torn last line (a killed writer) is cut by both readers alike
    torn = tmp_path / "results.csv"
    torn.write_bytes(path.read_bytes() + b"deadbeef,0,1")
    assert cells_read_fast(torn, table) is not None
    pd.testing.assert_frame_equal(engram.load_results(torn), careful)


@pytest.mark.parametrize("damage", ["short row", "not a number", "empty seed", "bad utf-8"])
def test_the_fast_reader_leaves_every_damaged_file_to_read_rows(folders, tmp_path, damage):
    from engram.frames import cells_read_fast

    lines = (folders["continual"] / "results.csv").read_bytes().splitlines(keepends=True)
    fields = lines[2].split(b",")
    seed = TABLES["continual"].columns.index("seed")
    if damage == "short row":
        fields = fields[:-1]
        fields[-1] += b"\n"
    else:
        fields[seed] = {"not a number": b"zero", "empty seed": b"",
                        "bad utf-8": b"\xff"}[damage]
    (tmp_path / "results.csv").write_bytes(b"".join(lines[:2] + [b",".join(fields)] + lines[3:]))
    assert cells_read_fast(tmp_path / "results.csv", TABLES["continual"]) is None
    with pytest.raises(DataError) as from_rows:
        read_rows(tmp_path / "results.csv")
    with pytest.raises(DataError) as from_frames:
        engram.load_results(tmp_path)
    assert str(from_frames.value) == str(from_rows.value)


@pytest.mark.parametrize("kind", KINDS)
def test_parquet_export_gives_the_same_frame(folders, kind, tmp_path):
    out = tmp_path / "copy.parquet"
    assert main(["export", str(folders[kind]), "--parquet", "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(engram.load_results(out), engram.load_results(folders[kind]))


def test_export_writes_each_folders_parquet_and_a_folder_without_csv_loads_it(folders, tmp_path,
                                                                              capsys):
    import shutil

    copies = [shutil.copytree(folders[k], tmp_path / k) for k in ("continual", "window")]
    assert main(["export", *map(str, copies), "--parquet"]) == 0
    assert capsys.readouterr().out.split() == [str(c / "results.parquet") for c in copies]
    for copy, kind in zip(copies, ("continual", "window")):
        expected = engram.load_results(folders[kind])
        (copy / "results.csv").unlink()  # the folder now holds only the Parquet file
        pd.testing.assert_frame_equal(engram.load_results(copy), expected)


def test_export_out_joins_folders_of_one_kind_and_refuses_two_kinds(folders, tmp_path, capsys):
    joined = tmp_path / "joined.parquet"
    assert main(["export", str(folders["continual"]), str(folders["other"]), "--parquet",
                 "--out", str(joined)]) == 0
    frame = engram.load_results(joined)
    assert list(frame["name"].unique()) == ["first", "second"]
    assert len(frame) == len(engram.load_results(folders["continual"])) + \
        len(engram.load_results(folders["other"]))
    assert main(["export", str(folders["continual"]), str(folders["window"]), "--parquet",
                 "--out", str(tmp_path / "mixed.parquet")]) == 2
    err = capsys.readouterr().err
    assert "hold different tables" in err and err.count("\n") == 1
    assert not (tmp_path / "mixed.parquet").exists()


def test_accuracy_matrix_of_each_run_equals_one_built_by_hand(folders):
    frame = engram.load_results(folders["continual"])
    matrices = engram.accuracy_matrices(frame)
    rows = read_rows(folders["continual"] / "results.csv")
    run_ids = list(dict.fromkeys(r["run_id"] for r in rows))
    assert list(matrices) == run_ids and len(run_ids) == 2
    for run_id in run_ids:
        # end-of-task test accuracies: task_trained i, task_eval j, the last step of task i
        mine = [r for r in rows if r["run_id"] == run_id and r["metric"] == "accuracy"
                and r["split"] == "test" and r["task_trained"] != "0"]
        by_hand = np.full((3, 3), math.nan)
        last = {}
        for r in sorted(mine, key=lambda r: int(r["step"])):
            i, j = int(r["task_trained"]) - 1, int(r["task_eval"]) - 1
            by_hand[i, j] = float(r["value"])
            last[i, j] = r["step"]
        assert len(last) == 9
        np.testing.assert_array_equal(matrices[run_id], by_hand)
    # naive fine-tuning on class-incremental digits: the last task is learned, so R differs
    # between runs and is no constant
    first, second = matrices.values()
    assert not np.array_equal(first, second)


def test_accuracy_matrices_need_a_continual_table(folders):
    with pytest.raises(DataError, match="continual results table"):
        engram.accuracy_matrices(engram.load_results(folders["window"]))


def test_a_damaged_csv_gives_read_rows_one_line_error(folders, tmp_path, capsys):
    lines = (folders["continual"] / "results.csv").read_text().splitlines(keepends=True)
    seed = TABLES["continual"].columns.index("seed")
    fields = lines[2].split(",")
    fields[seed] = "zero"
    (tmp_path / "results.csv").write_text("".join(lines[:2] + [",".join(fields)] + lines[3:]))
    with pytest.raises(DataError) as from_rows:
        read_rows(tmp_path / "results.csv")
    with pytest.raises(DataError) as from_frames:
        engram.load_results(tmp_path)
    assert str(from_frames.value) == str(from_rows.value)
    assert "line 3, column seed" in str(from_rows.value) and "\n" not in str(from_rows.value)
    assert main(["export", str(tmp_path), "--parquet"]) == 2
    assert capsys.readouterr().err == f"engram: error: {from_rows.value}\n"


def test_missing_files_and_a_damaged_parquet_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="results.csv does not exist"):
        engram.load_results(tmp_path)
    with pytest.raises(DataError, match="nowhere.csv does not exist"):
        engram.load_results(tmp_path / "nowhere.csv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet is not a readable Parquet file") as err:
        engram.load_results(tmp_path / "broken.parquet")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("missing", ["pandas", "pyarrow"])
def test_without_the_extra_the_error_names_it(folders, monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import pandas` now raises ImportError
    assert main(["export", str(folders["continual"]), "--parquet", "--out", "x.parquet"]) == 2
    err = capsys.readouterr().err
    assert f"needs {missing}" in err and '".[results]"' in err and err.count("\n") == 1
    if missing == "pandas":
        with pytest.raises(EngramError, match=r"engram.load_results needs pandas"):
            engram.load_results(folders["continual"])


def test_import_engram_stays_cheap():
    code = ("import sys, engram; assert 'pandas' not in sys.modules; "
            "assert 'engram.frames' not in sys.modules; assert 'numpy' not in sys.modules; "
            "engram.load_results; assert 'pandas' not in sys.modules; "
            "assert 'engram.frames' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_summary_joins_folders_as_table_does(folders, capsys):
    assert main(["summary", str(folders["continual"]), str(folders["other"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    methods = [line.split()[0] for line in lines[2:4]]
    assert methods == ["naive", "second"] and lines[3].startswith("second / naive")
    assert main(["summary", str(folders["continual"]), str(folders["continual"] / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere/results.csv does not exist" in err and err.count("\n") == 1


def test_plot_joins_folders_into_the_first_folders_plots_or_out(folders, tmp_path, capsys):
    import shutil

    first = shutil.copytree(folders["continual"], tmp_path / "first")
    assert main(["plot", str(first), str(folders["other"])]) == 0
    written = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["accuracy_matrix_first_naive.png", "accuracy_matrix_second_naive.png",
                     "comparison.png", "task_accuracy_first_naive.png",
                     "task_accuracy_second_naive.png"]
    assert all(p.startswith(str(first / "plots") + "/") for p in written)
    assert main(["plot", str(first), str(folders["other"]), "--out", str(tmp_path / "figs")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == names
