"""Generate the shell completion scripts in ``completions/`` from the ``sow`` CLI.

    .venv/bin/python scripts/completions.py            # print whether completions/ is up to date
    .venv/bin/python scripts/completions.py --write    # regenerate completions/sow.{bash,zsh,fish}

The scripts are what ``sow --show-completion`` prints (Typer's completion machinery, the same as
``_SOW_COMPLETE=source_bash sow``): small shell functions that ask ``sow`` itself for the
candidates (``_SOW_COMPLETE=complete_bash sow``), so they follow every command and option of the
installed ``sow``. They are generated here with the program name forced to ``sow``, whatever
interpreter runs this script. ``tests/test_completions.py`` fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "completions"
SHELLS = {"bash": "sow.bash", "zsh": "sow.zsh", "fish": "sow.fish"}
PROG = "sow"
COMPLETE_VAR = "_SOW_COMPLETE"
REGENERATE = ".venv/bin/python scripts/completions.py --write"

# Runs the real Typer app in a fresh interpreter (as the shell would) under the name "sow".
_RUN_APP = f"from sowcli.cli import app; app(prog_name={PROG!r})"


def generate(shell: str) -> str:
    """The completion script for ``shell`` as the current CLI generates it."""
    env = {**os.environ, COMPLETE_VAR: f"source_{shell}", "PYTHONPATH": str(ROOT)}
    env.pop("SOW_DEBUG", None)
    out = subprocess.run(
        [sys.executable, "-c", _RUN_APP],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"generating the {shell} completion failed: {out.stderr.strip()}")
    return out.stdout.strip() + "\n"


def stale() -> list[str]:
    """Names of the files in completions/ that differ from what the CLI generates."""
    names = []
    for shell, name in SHELLS.items():
        path = OUT_DIR / name
        if not path.is_file() or path.read_text() != generate(shell):
            names.append(f"completions/{name}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="regenerate the files")
    args = parser.parse_args(argv)
    if args.write:
        OUT_DIR.mkdir(exist_ok=True)
        for shell, name in SHELLS.items():
            (OUT_DIR / name).write_text(generate(shell))
            print(f"wrote completions/{name}")
        return 0
    names = stale()
    if names:
        print(f"stale: {', '.join(names)}; run: {REGENERATE}", file=sys.stderr)
        return 1
    print("completions/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
