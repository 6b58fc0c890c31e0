"""Meta-tests: the README stays true to the code."""

from __future__ import annotations

from pathlib import Path

import typer.main

from sowcli.cli import app
from sowcli.config import keys

ROOT = Path(__file__).resolve().parents[1]


def test_readme_configuration_table_is_current() -> None:
    import runpy

    mod = runpy.run_path(str(ROOT / "scripts/config_table.py"))
    readme = (ROOT / "README.md").read_text()
    assert mod["table"]() in readme, "run: .venv/bin/python scripts/config_table.py --write"
    for key in keys():
        assert f"`{key}`" in readme


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    for name in group.commands:
        assert f"`sow {name}" in readme, f"sow {name} is not documented in README.md"


def test_changelog_has_an_unreleased_section() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
