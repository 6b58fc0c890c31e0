"""``python -m sowcli`` is the same as ``sow``."""

from sowcli.cli import main

main()
