"""Print the README's configuration table from sowcli.config (the single source of truth).

.venv/bin/python scripts/config_table.py            # print it
.venv/bin/python scripts/config_table.py --write    # replace it in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from sowcli.config import describe

BEGIN, END = "<!-- config-table:begin -->", "<!-- config-table:end -->"


def table() -> str:
    rows = ["| key | environment | default | meaning |", "|---|---|---|---|"]
    for key, env, default, help_text in describe():
        shown = default if len(default) < 40 else default[:37] + "..."
        rows.append(f"| `{key}` | `{env}` | `{shown}` | {help_text} |")
    return "\n".join(rows)


def main() -> None:
    text = table()
    if "--write" not in sys.argv:
        print(text)
        return
    readme = Path(__file__).resolve().parents[1] / "README.md"
    doc = readme.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
