"""sow — SOW Market Hub: Bybit v5 market data fanned out over NATS, stored and served.

The package is both a library and the ``sow`` command. Stages are plain async functions
(``sowcli.publish.run_publish`` and friends); ``sowcli.cli`` is a thin Typer shell over them.
"""

__version__ = "0.1.0"
