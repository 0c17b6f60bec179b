"""The API reference (docs/build_api.py, pdoc) builds cleanly, and every public name has its
anchor on its page and a docstring."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

pdoc = pytest.importorskip("pdoc")
import pdoc.doc  # noqa: E402

import engram  # noqa: E402

BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "build_api.py"


def load_build_api() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("build_api", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_api"] = module  # as an import would, for anything looking it up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    build_api = load_build_api()
    out = tmp_path_factory.mktemp("api")
    return build_api, out, build_api.build(out)


def test_builds_without_warnings_or_broken_references(built):
    _, out, problems = built
    assert problems == []
    assert (out / "index.html").is_file()


def test_every_public_name_has_an_anchor_and_a_docstring(built):
    build_api, out, _ = built
    missing = []
    for module_name, names in build_api.PUBLIC.items():
        page = out / (module_name.replace(".", "/") + ".html")
        assert page.is_file(), f"no page for {module_name}"
        html = page.read_text(encoding="utf-8")
        module_doc = pdoc.doc.Module(importlib.import_module(module_name))
        assert module_doc.docstring.strip(), f"{module_name} has no module docstring"
        for name in names:
            if f'id="{name}"' not in html:
                missing.append(f"{module_name}.{name}: no anchor")
            member = module_doc.get(name)
            if member is None or not member.docstring.strip():
                missing.append(f"{module_name}.{name}: no docstring")
    assert missing == []


def test_the_roots_lazy_names_are_all_public_and_documented(built):
    build_api, _, _ = built
    assert sorted(engram.__all__) == sorted(engram.LAZY) == sorted(build_api.PUBLIC["engram"])
    assert set(build_api.PUBLIC) <= set(build_api.MODULES)


def test_a_broken_docstring_reference_is_reported(built):
    build_api, _, _ = built
    fake = types.ModuleType("fake_module", "Uses engram.metrics.average_forgetting and "
                            "`engram.metrics.no_such_metric`; engram.api.FitResult.rows too.")
    problems = build_api.broken_references([pdoc.doc.Module(fake)])
    assert len(problems) == 1 and "engram.metrics.no_such_metric" in problems[0]
