"""The site secret: created atomically (temp, fsync, link), shared by concurrent creators, 0600,
never shown in an error."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway_agent._exceptions import ConfigError
from gateway_agent.deid.keys import Keys, load_or_create_secret


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_once_0600_in_a_0700_folder_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "secret.key"
    first = load_or_create_secret(path)
    assert len(first) == 64 and bytes.fromhex(first.decode())
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert load_or_create_secret(path) == first
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temp file left


def test_an_empty_leftover_temp_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    # What a kill between the temp file's creation and its write leaves behind.
    leftover = tmp_path / ".secret.key.4242.0123456789ab.tmp"
    leftover.touch()
    made = load_or_create_secret(path)
    assert len(made) == 64 and path.read_bytes().strip() == made
    assert load_or_create_secret(path) == made
    assert leftover.exists() and leftover.stat().st_size == 0


def test_an_existing_secret_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.write_bytes(b"an-existing-site-secret-0123456789\n")
    assert load_or_create_secret(path) == b"an-existing-site-secret-0123456789"
    assert path.read_bytes() == b"an-existing-site-secret-0123456789\n"


def _create_in_rounds(barrier: Any, paths: list[str], out: Any) -> None:
    for p in paths:
        barrier.wait(timeout=60)
        out.put((p, load_or_create_secret(Path(p))))


def test_concurrent_creation_by_two_processes_yields_one_shared_secret(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    out = ctx.Queue()
    paths = [str(tmp_path / f"round{i}" / "secret.key") for i in range(5)]
    procs = [ctx.Process(target=_create_in_rounds, args=(barrier, paths, out)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        got: dict[str, set[bytes]] = {}
        for _ in range(2 * len(paths)):
            path, secret = out.get(timeout=120)
            got.setdefault(path, set()).add(secret)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    for path in paths:
        (secret,) = got[path]  # both processes use the same secret
        assert Path(path).read_bytes().strip() == secret
        assert _mode(Path(path)) == 0o600
        assert [q.name for q in Path(path).parent.iterdir()] == ["secret.key"]


def _chain(exc: BaseException) -> str:
    """Everything a traceback of ``exc`` would show about it and its causes."""
    text = []
    seen: BaseException | None = exc
    while seen is not None:
        text.append(f"{type(seen).__name__}: {seen} {seen.args!r}")
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return "\n".join(text)


def test_the_secret_is_never_in_an_error_message(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"SECRETVAL\n")
    with pytest.raises(ConfigError) as info:
        load_or_create_secret(short)
    assert "SECRETVAL" not in _chain(info.value)

    folder = tmp_path / "is-a-folder.key"
    folder.mkdir()
    with pytest.raises(ConfigError) as info:
        load_or_create_secret(folder)
    assert str(folder) not in _chain(info.value)

    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        load_or_create_secret(blocker / "secret.key")  # parent is a file
    assert str(blocker) not in _chain(info.value)

    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "nowhere")  # unreadable, and in the way of a new one
    with pytest.raises(ConfigError) as info:
        load_or_create_secret(dangling)
    assert str(dangling) not in _chain(info.value)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    secret = load_or_create_secret(tmp_path / "ok.key")
    with pytest.raises(ValueError) as err:
        Keys(secret[:8])
    assert secret[:8].decode() not in _chain(err.value)
