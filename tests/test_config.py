"""Settings precedence and the one-line errors a broken configuration gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sowcli.cli import app
from sowcli.config import DEFAULT_SYMBOLS, load_settings
from sowcli.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={})
    assert s.symbols == list(DEFAULT_SYMBOLS)
    assert len(s.symbols) == 15 and "POLUSDT" in s.symbols and "MATICUSDT" not in s.symbols
    assert s.max_retries == 0 and s.reconnect_timeout_seconds == 30
    assert s.nats_url == "nats://localhost:4222"


def test_shipped_config_json_is_valid_and_matches_defaults() -> None:
    s = load_settings(REPO / "config.json", environ={})
    assert s.symbols == list(DEFAULT_SYMBOLS)


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, {"symbols": ["ethusdt"], "max_retries": 5, "log_level": "debug"})
    s = load_settings(path, environ={})
    assert s.symbols == ["ETHUSDT"] and s.max_retries == 5 and s.log_level == "DEBUG"
    env = {"SOW_MAX_RETRIES": "7", "NATS_URL": "nats://h:1", "SOW_SYMBOLS": "BTCUSDT,SOLUSDT"}
    s = load_settings(path, environ=env)
    assert s.max_retries == 7 and s.nats_url == "nats://h:1" and s.symbols == ["BTCUSDT", "SOLUSDT"]
    s = load_settings(path, {"max_retries": 9, "symbols": "XRPUSDT", "nats_url": None}, environ=env)
    assert s.max_retries == 9 and s.symbols == ["XRPUSDT"] and s.nats_url == "nats://h:1"


def test_sow_config_env_selects_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"log_level": "ERROR"})
    assert load_settings(environ={"SOW_CONFIG": str(path)}).log_level == "ERROR"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ("{not json", "invalid JSON at line 1"),
        ([1, 2], "top level must be a JSON object"),
        ({"symbols": "BTCUSDT"}, "key 'symbols': expected a list"),
        ({"symbols": ["BTC-USDT"]}, "key 'symbols': item 1 'BTC-USDT' is not a valid symbol"),
        ({"symbols": [42]}, "key 'symbols': item 1 42 is not a string"),
        ({"max_retries": "3"}, "key 'max_retries': expected an integer"),
        ({"max_retries": -1}, "key 'max_retries': must be 0"),
        (
            {"reconnect_timeout_seconds": 0},
            "key 'reconnect_timeout_seconds': must be greater than 0",
        ),
        ({"log_level": "LOUD"}, "key 'log_level'"),
        ({"markets": ["options"]}, "unknown market 'options'"),
        ({"symbolz": []}, "unknown key 'symbolz' (did you mean 'symbols'?)"),
    ],
)
def test_broken_config_names_file_key_and_problem(tmp_path: Path, doc: object, needle: str) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment SOW_MAX_RETRIES: key 'max_retries'"):
        load_settings(environ={"SOW_MAX_RETRIES": "many"})


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.json", environ={})


def test_cli_reports_config_error_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    """Through the real entry point (not CliRunner): one red line, no traceback, exit code 2."""
    import subprocess
    import sys

    path = write(tmp_path, {"max_retries": "lots"})
    proc = subprocess.run(
        [sys.executable, "-m", "sowcli", "publish", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "max_retries" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in proc.stderr


def test_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sowcli",
            "publish",
            "--symbols",
            "BTC/USDT",
            "--config",
            str(write(tmp_path, {})),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--symbols" in proc.stderr and "BTC/USDT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_command_has_help_with_an_example() -> None:
    import typer.main

    runner = CliRunner()
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    names = list(group.commands)
    assert {"publish", "subscribe"} <= set(names)
    for name in names:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "sow " + name in result.output, f"`sow {name} --help` shows no example"
