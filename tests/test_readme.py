"""The README's Quickstart is what CI runs: two commands, the second one verbatim in .ci/run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quickstart_is_two_commands_install_and_demo_then_install_and_test():
    commands = _quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].startswith("pip install") and commands[0].endswith("engram demo")
    assert commands[1].startswith("pip install") and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quickstart_commands()[1] in ci_lines


def test_every_registered_method_has_a_row_in_the_readme_methods_table():
    from engram.methods import METHODS

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in METHODS.names() if f"| `{name}` |" not in readme]
    assert not missing, f"README methods table lacks: {missing}"
