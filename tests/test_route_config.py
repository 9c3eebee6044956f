"""The configuration file of `route` (dicomnet.route.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnet.route.config import ConfigError, load_config, parse_config

GOOD = """
[listen]
port = 11200
aet = "ROUTER"
allow = ["CT*"]

[queue]
folder = "q"
max_queued = 50

[[destination]]
name = "archive"
aet = "ARCHIVE"
host = "127.0.0.1"
port = 11201
window = 4
backoff = 1

[[destination]]
name = "ai"
aet = "AI"
host = "127.0.0.1"
port = 11202

[[rule]]
match = { Modality = "CT" }
forward = ["archive", "ai"]
"""


def test_a_configuration_with_defaults(tmp_path: Path) -> None:
    file = tmp_path / "route.toml"
    file.write_text(GOOD)
    config = load_config(file)
    assert (config.host, config.port, config.aet, config.allow) == (
        "127.0.0.1",
        11200,
        "ROUTER",
        ("CT*",),
    )
    assert config.queue == tmp_path / "q" and config.max_queued == 50 and config.fsync
    archive, ai = config.destinations
    assert (archive.window, archive.backoff, archive.attempts) == (4, 1.0, 10)
    assert (ai.associations, ai.window) == (2, 1)
    assert config.rules[0].forward == ("archive", "ai")
    assert (config.database, config.node, config.lease) == (None, None, 30.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("port = 11201", 'port = "x"'), "destination 'archive'.port: expected int"),
        (('name = "ai"', 'name = "archive"'), "two destinations have the same name"),
        (('forward = ["archive", "ai"]', 'forward = ["pacs"]'), "no destination named 'pacs'"),
        (("max_queued = 50", "max_queue = 50"), "queue: unknown setting 'max_queue'"),
        (("window = 4", "window = 0"), "at least 1"),
        (('aet = "AI"\n', ""), "destination 'ai': aet is needed"),
        (('aet = "ROUTER"\n', 'aet = "ROUTER"\nrequire_user = true\n'), "needs listen.users"),
        (("max_queued = 50", 'database = "q.sqlite"'), "queue.database: a postgresql:// URL"),
        (("max_queued = 50", 'node = "n1"'), "queue.node: only with queue.database"),
        (("max_queued = 50", 'database = "postgresql://db/r"\nlease = 0'), "queue.lease"),
    ],
)
def test_what_is_wrong_in_one_line(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    file = tmp_path / "route.toml"
    file.write_text(GOOD.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(file) in str(info.value)


def test_not_toml_and_no_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[listen\n")
    with pytest.raises(ConfigError, match="not TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.toml")
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="nothing to route to"):
        load_config(empty)


def test_the_guide_s_example_is_a_valid_configuration() -> None:
    import re

    import tomllib

    from dicomnet.route.config import parse_config

    guide = (Path(__file__).resolve().parent.parent / "docs" / "commands.md").read_text()
    section = guide.split("## route\n", 1)[1].split("\n## ", 1)[0]
    block, shared = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    config = parse_config(tomllib.loads(block))
    assert [d.name for d in config.destinations] == ["archive", "ai"]
    assert len(config.rules) == 2
    # The queue shared by several nodes: its [queue] in place of the first's.
    config = parse_config({**tomllib.loads(block), **tomllib.loads(shared)})
    assert config.database == "postgresql://route@db.example/route"
    assert (config.node, config.lease) == ("route-1", 30.0)


def test_a_destination_presents_the_listen_certificate_unless_it_has_its_own(
    tmp_path: Path,
) -> None:
    listen = {"tls_cert": "node.crt", "tls_key": "node.key"}
    destination = {"aet": "A", "host": "h", "port": 1, "tls": True}
    config = parse_config(
        {
            "listen": listen,
            "destination": [
                {"name": "a", **destination},
                {"name": "b", **destination, "tls_cert": "b.crt", "tls_key": "b.key"},
            ],
            "rule": [{"forward": ["a", "b"]}],
        },
        tmp_path,
    )
    a, b = config.destinations
    assert (a.tls_cert, a.tls_key) == (str(tmp_path / "node.crt"), str(tmp_path / "node.key"))
    assert (b.tls_cert, b.tls_key) == (str(tmp_path / "b.crt"), str(tmp_path / "b.key"))
