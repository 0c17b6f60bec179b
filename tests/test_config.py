"""Config loading, defaults, overrides, every user-facing ConfigError, run ids, field docs."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from engram.config import DataConfig, MethodSpec, ModelConfig, RunConfig, StreamConfig, TrainConfig, load_config, load_config_dict, parse_method
from engram.experiments.continual import continual_run_id as run_id
from engram.schema import describe_fields
from engram.data import DATASETS, STREAMS
from engram.errors import ConfigError
from engram.methods import METHODS
from engram.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def cfg_from(**raw):
    return load_config_dict(copy.deepcopy(raw))


# ----------------------------------------------------------------------------- loading

def test_demo_yaml_loads_with_its_values():
    cfg = load_config(DEMO)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "demo"
    assert cfg.seeds == [0, 1, 2]
    assert cfg.data.source == "digits" and cfg.data.val_fraction == 0.1
    assert cfg.stream.kind == "split" and cfg.stream.scenario == "class"
    assert cfg.train.eval_every == 2 and cfg.train.eval_splits == ["val", "test"]
    assert [m.name for m in cfg.methods] == ["naive", "ewc", "replay", "joint"]
    ewc = cfg.methods[1]
    assert ewc.params.strength == 100.0 and ewc.params.fisher == "exact"
    assert cfg.methods[2].params.memory == 200


def test_defaults_fill_missing_keys():
    cfg = cfg_from(train={"epochs": 3})
    assert cfg.train.epochs == 3
    # everything else comes from the dataclass defaults
    assert cfg.train.batch_size == TrainConfig().batch_size == 32
    assert cfg.train.lr == 0.05
    assert cfg.data == DataConfig()
    assert cfg.stream == StreamConfig()
    assert cfg.model == ModelConfig()
    assert cfg.seeds == [0] and cfg.plots is True
    assert [m.name for m in cfg.methods] == ["naive"]


def test_empty_config_is_all_defaults():
    assert load_config_dict(None) == RunConfig()
    assert load_config_dict({}) == RunConfig()


def test_empty_yaml_section_means_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\ntrain:\n  epochs: 2\n")
    cfg = load_config(path)
    assert cfg.data == DataConfig() and cfg.train.epochs == 2


def test_int_is_accepted_for_float_and_converted():
    cfg = cfg_from(train={"lr": 1})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("1E-3", 1e-3), ("5e2", 500.0), ("+2e1", 20.0), ("1.0e3", 1000.0),
    (".5e-1", 0.05), ("1.5e-2", 0.015), ("0.05", 0.05), ("3", 3.0),
])
def test_exponent_floats_are_numbers(tmp_path, text, value):
    """YAML 1.1 (PyYAML) reads `1e-3` and `1.0e3` as strings; engram reads them as floats."""
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {text}\n")
    assert load_config(path).train.lr == pytest.approx(value)
    assert load_config_dict({}, [f"train.lr={text}"]).train.lr == pytest.approx(value)
    assert load_config_dict({}, [f"methods=[{{name: ewc, strength: {text}}}]"]
                            ).methods[0].params.strength == pytest.approx(value)


def test_exponent_float_is_still_not_an_integer():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 1000\.0"):
        load_config_dict({}, ["train.epochs=1e3"])
    # words that merely contain an e stay strings
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got 'e3'"):
        load_config_dict({}, ["train.lr=e3"])


def test_single_method_may_be_a_string():
    cfg = cfg_from(methods="ewc")
    assert [m.name for m in cfg.methods] == ["ewc"]


# ----------------------------------------------------------------------------- overrides

def test_dotted_overrides():
    cfg = load_config(DEMO, ["train.epochs=5", "seeds=[0,1]", "methods.1.strength=10",
                             "data.path=null", "stream.scenario=task"])
    assert cfg.train.epochs == 5
    assert cfg.seeds == [0, 1]
    assert cfg.methods[1].name == "ewc" and cfg.methods[1].params.strength == 10.0
    assert cfg.methods[1].params.fisher == "exact"  # the rest of the entry is kept
    assert cfg.data.path is None
    assert cfg.stream.scenario == "task"


def test_override_sets_a_path_and_creates_sections():
    cfg = load_config_dict({}, ["data.path=/some/where", "model.hidden=[8, 4]"])
    assert cfg.data.path == "/some/where"
    assert cfg.model.hidden == [8, 4]


def test_override_into_an_empty_yaml_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n")
    cfg = load_config(path, ["data.limit=5"])
    assert cfg.data.limit == 5


def test_overrides_are_validated_like_the_file():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 'ten'"):
        load_config(DEMO, ["train.epochs=ten"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match=r"override 'train\.epochs' must look like dotted\.key=value"):
        load_config(DEMO, ["train.epochs"])


def test_override_index_out_of_range():
    with pytest.raises(ConfigError,
                       match=r"override methods\.7\.strength: '7' is not an index of a 4-entry list"):
        load_config(DEMO, ["methods.7.strength=1"])


def test_override_non_numeric_index():
    with pytest.raises(ConfigError, match=r"'first' is not an index of a 4-entry list"):
        load_config(DEMO, ["methods.first.strength=1"])


def test_override_into_a_scalar():
    with pytest.raises(ConfigError, match=r"override train\.epochs\.x: train\.epochs is not a mapping"):
        load_config(DEMO, ["train.epochs.x=1"])


def test_override_with_invalid_yaml_value():
    with pytest.raises(ConfigError, match=r"override 'seeds=\[0,' is not valid YAML"):
        load_config(DEMO, ["seeds=[0,"])


# ----------------------------------------------------------------------------- errors

def test_unknown_top_level_key_names_key_and_lists_allowed():
    with pytest.raises(ConfigError) as info:
        cfg_from(epochs=3)
    msg = str(info.value)
    assert msg.startswith("unknown key epochs; allowed keys in the top level: ")
    for key in ("name", "seeds", "device", "threads", "plots", "data", "stream", "model",
                "train", "methods"):
        assert re.search(rf"\b{key}\b", msg.split(":", 1)[1]), key


def test_unknown_nested_key_names_dotted_key():
    with pytest.raises(ConfigError,
                       match=r"unknown key train\.epoch; allowed keys in train: epochs, batch_size"):
        cfg_from(train={"epoch": 3})


def test_wrong_type_int():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 'ten'"):
        cfg_from(train={"epochs": "ten"})


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got True"):
        cfg_from(train={"epochs": True})


def test_bool_is_not_a_float():
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number, got False"):
        cfg_from(train={"lr": False})


def test_float_is_not_an_int():
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer, got 3\.5"):
        cfg_from(train={"batch_size": 3.5})


def test_wrong_type_bool():
    with pytest.raises(ConfigError, match=r"plots: expected true or false, got 'yes please'"):
        cfg_from(plots="yes please")


def test_wrong_type_string():
    with pytest.raises(ConfigError, match=r"name: expected a string, got 3"):
        cfg_from(name=3)


def test_wrong_type_optional():
    with pytest.raises(ConfigError, match=r"data\.limit: expected int or null, got 'x'"):
        cfg_from(data={"limit": "x"})


def test_wrong_type_list():
    with pytest.raises(ConfigError, match=r"seeds: expected a list of int, got 3"):
        cfg_from(seeds=3)
    with pytest.raises(ConfigError, match=r"seeds\[1\]: expected an integer, got 'a'"):
        cfg_from(seeds=[0, "a"])


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"train: expected a mapping of keys to values, got 5"):
        cfg_from(train=5)


@pytest.mark.parametrize("raw, pattern", [
    ({"train": {"lr": -1}}, r"train\.lr: -1\.0 is out of range; allowed: >= 0\.0"),
    ({"data": {"test_fraction": 2}}, r"data\.test_fraction: 2\.0 is out of range; allowed: \[0\.01, 0\.9\]"),
    ({"train": {"epochs": 0}}, r"train\.epochs: 0 is out of range; allowed: >= 1"),
    ({"train": {"momentum": 1.0}}, r"train\.momentum: 1\.0 is out of range; allowed: \[0\.0, 0\.999\]"),
    ({"data": {"limit": 0}}, r"data\.limit: 0 is out of range; allowed: >= 1"),
    ({"train": {"lr": float("nan")}}, r"train\.lr: nan is out of range; allowed: >= 0\.0"),
    # list entries are checked one by one (these used to reach torch as a RuntimeError)
    ({"model": {"hidden": [16, 0]}}, r"model\.hidden: 0 is out of range; allowed: >= 1"),
    ({"model": {"channels": [-4]}}, r"model\.channels: -4 is out of range; allowed: >= 1"),
])
def test_out_of_range(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cfg_from(**raw)


def test_range_bounds_are_inclusive():
    cfg = cfg_from(train={"lr": 0, "momentum": 0.999}, data={"test_fraction": 0.9})
    assert cfg.train.lr == 0.0 and cfg.train.momentum == 0.999 and cfg.data.test_fraction == 0.9


def test_literal_violation_lists_choices():
    with pytest.raises(ConfigError, match=r"stream\.scenario: 'banana' is not allowed; "
                                          r"choose one of: 'task', 'domain', 'class'"):
        cfg_from(stream={"scenario": "banana"})


def test_literal_inside_a_list():
    with pytest.raises(ConfigError, match=r"train\.eval_splits\[0\]: 'train' is not allowed; "
                                          r"choose one of: 'val', 'test'"):
        cfg_from(train={"eval_splits": ["train"]})


@pytest.mark.parametrize("raw, key, kind, bad, registry", [
    ({"data": {"source": "imagenet"}}, r"data\.source", "dataset", "imagenet", DATASETS),
    ({"stream": {"kind": "shuffled"}}, r"stream\.kind", "stream", "shuffled", STREAMS),
    ({"model": {"kind": "resnet"}}, r"model\.kind", "model", "resnet", MODELS),
    ({"methods": ["packnet_v9"]}, r"methods\[0\]\.name", "method", "packnet_v9", METHODS),
])
def test_unknown_registry_name_lists_allowed(raw, key, kind, bad, registry):
    assert len(registry) >= 2
    allowed = re.escape(", ".join(registry.names()))
    with pytest.raises(ConfigError, match=rf"^{key}: unknown {kind} '{bad}'; choose one of: {allowed}$"):
        cfg_from(**raw)


def test_unknown_method_name_in_second_entry():
    with pytest.raises(ConfigError, match=r"methods\[1\]\.name: unknown method 'banana'"):
        cfg_from(methods=["naive", {"name": "banana"}])


def test_unknown_method_parameter():
    with pytest.raises(ConfigError, match=r"unknown key methods\[0\]\(ewc\)\.strenght; "
                                          r"allowed keys in methods\[0\]\(ewc\): strength, fisher"):
        cfg_from(methods=[{"name": "ewc", "strenght": 1}])


def test_method_parameter_wrong_type_and_range():
    with pytest.raises(ConfigError, match=r"methods\[0\]\(ewc\)\.strength: expected a number, got 'big'"):
        cfg_from(methods=[{"name": "ewc", "strength": "big"}])
    with pytest.raises(ConfigError, match=r"methods\[0\]\(ewc\)\.strength: -1\.0 is out of range"):
        cfg_from(methods=[{"name": "ewc", "strength": -1}])


def test_method_entry_without_name():
    with pytest.raises(ConfigError, match=r"methods\[0\]: each method needs a name, e\.g\. \{name: ewc\}; "
                                          r"got \{'strength': 1\}"):
        cfg_from(methods=[{"strength": 1}])


def test_methods_must_be_non_empty():
    with pytest.raises(ConfigError, match=r"methods: expected a non-empty list"):
        cfg_from(methods=[])


def test_invalid_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} is not valid YAML"):
        load_config(path)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(path))} does not exist"):
        load_config(path)


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- naive\n- ewc\n")
    with pytest.raises(ConfigError,
                       match=rf"{re.escape(str(path))}: the top level must be a mapping of keys to values"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^config: the top level must be a mapping"):
        load_config_dict("just a string")


# ----------------------------------------------------------------------------- run ids

def _ids(cfg):
    return [run_id(cfg, m, s) for m in cfg.methods for s in cfg.seeds]


def test_run_id_is_stable():
    a = load_config(DEMO)
    b = load_config(DEMO)
    assert _ids(a) == _ids(b)
    assert re.fullmatch(r"[0-9a-f]{12}", run_id(a, a.methods[0], 0))
    # all (method, seed) pairs of the demo are distinct runs
    assert len(set(_ids(a))) == len(a.methods) * len(a.seeds)


@pytest.mark.parametrize("override", ["train.lr=0.1", "methods.1.strength=10", "data.limit=100",
                                      "stream.scenario=task", "model.hidden=[64]"])
def test_run_id_changes_with_what_changes_the_numbers(override):
    base = load_config(DEMO)
    changed = load_config(DEMO, [override])
    ewc_base, ewc_changed = base.methods[1], changed.methods[1]
    assert run_id(base, ewc_base, 0) != run_id(changed, ewc_changed, 0)


def test_run_id_changes_with_seed_and_method():
    cfg = load_config(DEMO)
    assert run_id(cfg, cfg.methods[0], 0) != run_id(cfg, cfg.methods[0], 1)
    assert run_id(cfg, cfg.methods[0], 0) != run_id(cfg, cfg.methods[1], 0)


@pytest.mark.parametrize("override", ["name=other", "plots=false", "threads=4",
                                      "checkpoint_seconds=0", "device=cpu"])
def test_run_id_ignores_presentation_keys(override):
    base = load_config(DEMO)
    changed = load_config(DEMO, [override])
    assert changed != base  # the override did something
    assert _ids(base) == _ids(changed)


# ----------------------------------------------------------------------------- labels, docs

def test_label_shows_only_non_default_params():
    assert parse_method("ewc", {}, "m").label() == "ewc"
    assert parse_method("ewc", {"strength": 100}, "m").label() == "ewc"  # 100 is the default
    assert parse_method("ewc", {"strength": 10}, "m").label() == "ewc(strength=10.0)"
    assert (parse_method("ewc", {"strength": 10, "fisher": "batch"}, "m").label()
            == "ewc(strength=10.0,fisher=batch)")
    assert parse_method("naive", {}, "m").label() == "naive"
    assert isinstance(parse_method("naive", {}, "m"), MethodSpec)


def test_demo_labels():
    cfg = load_config(DEMO, ["methods.2.memory=50"])
    assert [m.label() for m in cfg.methods] == ["naive", "ewc", "replay(memory=50)", "joint"]


def _all_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        yield key
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _all_keys(hints[f.name], key + ".")


def test_describe_fields_mentions_every_key_with_a_doc():
    lines = describe_fields(RunConfig)
    keys = list(_all_keys(RunConfig))
    assert {"data.path", "stream.rotation_step", "model.activation", "train.eval_splits",
            "methods"} <= set(keys)
    for key in keys:
        matching = [ln for ln in lines if re.match(rf"\s*{re.escape(key)}( = |: )", ln)]
        assert len(matching) == 1, key
        doc = matching[0].rsplit(": ", 1)[1]
        assert doc.strip(), f"{key} has no doc"


def test_describe_fields_shows_defaults_and_types():
    lines = describe_fields(RunConfig)
    assert any(ln.strip().startswith("train.epochs = 20  (int): ") for ln in lines)
    assert any(ln.strip().startswith("data.limit = null  (int or null): ") for ln in lines)
    assert any(ln.strip().startswith("stream.scenario = \"class\"  ('task' or 'domain' or 'class')")
               for ln in lines)


def test_empty_seed_list_is_refused():
    with pytest.raises(ConfigError, match=r"seeds: give at least one seed"):
        load_config_dict({"seeds": []})


def test_repeated_seed_and_empty_eval_splits_are_refused():
    with pytest.raises(ConfigError, match=r"seeds: \[0, 0\] repeats a seed"):
        load_config_dict({"seeds": [0, 0]})
    with pytest.raises(ConfigError, match=r"train.eval_splits: give at least one split"):
        load_config_dict({"train": {"eval_splits": []}})
