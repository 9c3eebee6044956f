"""`dicomnet route status` and `route retry` on a queue folder, and the command's errors."""

from __future__ import annotations

import json
from pathlib import Path

from peers import describe_cli, run_dicomnet

from dicomnet.route.queue import Queue


def a_queue(folder: Path) -> Queue:
    queue = Queue(folder, ["archive", "ai"], fsync=False)
    for content in (b"one", b"two"):
        path = queue.temp_path()
        path.write_bytes(content)
        queue.put({"archive": path, "ai": path})
    (entry, _) = queue.pending("ai")
    queue.give_up(entry, "C-STORE 0xA900 Data set does not match SOP Class")
    return queue


def test_status_lists_each_destination(tmp_path: Path) -> None:
    a_queue(tmp_path / "q")
    result = run_dicomnet(["route", "status", "--queue", tmp_path / "q", "--json"])
    assert result.returncode == 0, describe_cli(result)
    data = json.loads(result.stdout)
    assert data["running"] is False
    assert data["destinations"]["archive"]["queued"] == 2
    assert (data["destinations"]["ai"]["queued"], data["destinations"]["ai"]["dead"]) == (1, 1)
    reason = "C-STORE 0xA900 Data set does not match SOP Class"
    assert data["destinations"]["ai"]["last_error"] == reason  # the dead letter's
    assert data["destinations"]["archive"]["last_error"] is None
    text = run_dicomnet(["route", "status", "--queue", tmp_path / "q"])
    assert "ai: queued 1" in text.stdout and "dead letters 1" in text.stdout, describe_cli(text)
    assert f"last error: {reason}" in text.stdout
    assert "no router running" in text.stdout


def test_retry_puts_dead_letters_back(tmp_path: Path) -> None:
    a_queue(tmp_path / "q")
    result = run_dicomnet(["route", "retry", "ai", "--queue", tmp_path / "q"])
    assert result.returncode == 0, describe_cli(result)
    assert result.stdout.strip() == "ai: 1 dead letter(s) back in the queue"
    assert len(Queue(tmp_path / "q", recover=False).pending("ai")) == 2


def test_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    bad = tmp_path / "route.toml"
    bad.write_text('[[destination]]\nname = "a"\naet = "A"\nhost = "h"\nport = "x"\n')
    for argv in (
        ["route"],
        ["route", "--config", bad],
        ["route", "status"],
        ["route", "status", "--queue", tmp_path / "none"],
        ["route", "retry", "--queue", tmp_path],
        ["route", "retry", "nowhere", "--queue", tmp_path],
    ):
        result = run_dicomnet(argv)
        assert result.returncode == 2, describe_cli(result)
        assert len(result.stderr.strip().splitlines()) == 1, describe_cli(result)
    assert "port: expected int" in run_dicomnet(["route", "--config", bad]).stderr
