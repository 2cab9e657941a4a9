"""Agent configuration: TOML keys, flags overriding the file, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, flag_overrides, load_config
from edge_agent.errors import ConfigError
from pocketfleet.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_file_keys_relative_paths_and_mqtt_table(tmp_path: Path) -> None:
    path = _write(tmp_path, 'state_dir = "state"\ntrust = "keys/pub.pem"\nmax_batch = 32\nkeepalive_s = 5\n'
                  '[mqtt]\nhost = "broker.local"\nport = 8883\n')
    cfg = load_config(path)
    assert cfg.state_dir == str(tmp_path / "state") and cfg.trust == str(tmp_path / "keys/pub.pem")
    assert (cfg.max_batch, cfg.keepalive_s) == (32, 5.0) and isinstance(cfg.keepalive_s, float)
    assert cfg.mqtt == {"host": "broker.local", "port": 8883}
    assert cfg.listen_address() == ("127.0.0.1", 8470) and cfg.outbox_file == tmp_path / "state" / "outbox.sqlite"


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'state_dir = "state"\nmax_batch = 32\nlisten = "127.0.0.1:9000"\n')
    args = build_parser().parse_args(["agent", "run", "--config", str(path), "--max-batch", "4", "--listen", "127.0.0.1:0"])
    cfg = load_config(args.config, flag_overrides(args))
    assert (cfg.max_batch, cfg.listen) == (4, "127.0.0.1:0")
    # and with no file at all, flags are the whole config
    args = build_parser().parse_args(["agent", "run", "--state-dir", str(tmp_path / "s"), "--threads", "2"])
    assert load_config(None, flag_overrides(args)).threads == 2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('state_dir = "s"\nmax_bach = 3\n', ["max_bach: unknown key", "max_batch"]),
        ('state_dir = "s"\nmax_batch = "32"\n', ["max_batch: expected an integer", "'32'"]),
        ('state_dir = "s"\nthreads = true\n', ["threads: expected an integer", "True"]),
        ('state_dir = "s"\nmax_batch = 0\n', ["max_batch must be >= 1"]),
        ('state_dir = "s"\nlisten = "localhost"\n', ["listen must be HOST:PORT"]),
        ('state_dir = "s"\nsink = "kafka:x"\n', ["sink must be"]),
        ("threads = 2\n", ["state_dir is required"]),
        ("state_dir = [\n", ["not valid TOML"]),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    for word in words:
        assert word in str(info.value)


def test_the_shipped_sample_config_loads() -> None:
    cfg = load_config(ROOT / "docs" / "agent.sample.toml")
    assert isinstance(cfg, AgentConfig) and cfg.listen_address()[0] == "127.0.0.1"
