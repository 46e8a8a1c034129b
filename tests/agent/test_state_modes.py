"""The daemon's state is private: state folder and outbox folder 0700, outbox copies 0600."""

from __future__ import annotations

import stat
from pathlib import Path

from ._agent_util import agent_settings, files_under, running_daemon, wait_until, write_synthetic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outbox_folder_and_files_are_private_after_a_run(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    # A state left by an older version: outbox folder 0755.
    outbox_dir = settings.state_dir / "outbox"
    outbox_dir.mkdir(parents=True)
    outbox_dir.chmod(0o755)
    write_synthetic(tmp_path / "inbox" / "s", 4, seed="modes")
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 60)
    outputs = [p for p in files_under(outbox_dir) if p.suffix == ".dcm"]
    assert len(outputs) == 4  # kept for sent_retention_hours
    assert len(files_under(settings.destination.folder)) == 4
    assert _mode(settings.state_dir) == 0o700
    assert _mode(outbox_dir) == 0o700
    assert {p.name: _mode(p) for p in outputs} == {p.name: 0o600 for p in outputs}
    assert _mode(settings.state_dir / "outbox.db") == 0o600
    assert _mode(settings.state_dir / "secret.key") == 0o600


def test_a_new_outbox_folder_is_private(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    with running_daemon(settings):
        pass
    assert _mode(settings.state_dir / "outbox") == 0o700
