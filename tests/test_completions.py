"""completions/ holds the bash, zsh and fish scripts the current CLI generates, and they work."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sow_completions", ROOT / "scripts/completions.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


completions = _script()


@pytest.mark.parametrize("shell", sorted(completions.SHELLS))
def test_committed_completion_matches_the_cli(shell: str) -> None:
    path = ROOT / "completions" / completions.SHELLS[shell]
    assert path.is_file(), f"{path} is missing; run: {completions.REGENERATE}"
    assert path.read_text() == completions.generate(shell), (
        f"completions/{path.name} is stale (the CLI changed); run: {completions.REGENERATE}"
    )


def _env() -> dict[str, str]:
    # the scripts call `sow` by name: put the sow of this interpreter's venv first on PATH
    bindir = str(Path(sys.executable).parent)
    if not (Path(bindir) / "sow").exists():
        pytest.skip("no sow script next to the interpreter")
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _bash_complete(words: list[str]) -> list[str]:
    """Source completions/sow.bash in bash and complete ``words`` (the last one may be '')."""
    if not shutil.which("bash"):
        pytest.skip("no bash")
    quoted = " ".join(f"'{w}'" for w in words)
    script = (
        f"source {ROOT / 'completions/sow.bash'}\n"
        f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        "_sow_completion sow\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_bash_completion_lists_subcommands_and_options() -> None:
    assert _bash_complete(["sow", "pu"]) == ["publish"]
    subcommands = set(_bash_complete(["sow", ""]))
    assert {"publish", "subscribe", "cache", "persist", "serve-api", "up", "query"} <= subcommands
    assert {"ohlc", "latest", "sql"} <= set(_bash_complete(["sow", "query", ""]))
    assert "--metrics-port" in _bash_complete(["sow", "publish", "--metr"])


def test_fish_completion_lists_subcommands() -> None:
    if not shutil.which("fish"):
        pytest.skip("no fish")
    out = subprocess.run(
        [
            "fish",
            "--no-config",
            "-c",
            f"source {ROOT / 'completions/sow.fish'}; complete -C 'sow pu'",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "publish" in out.stdout
