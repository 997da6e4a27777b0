"""The test servers' own harness: free ports and a redis-server that fails to start."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from bench.process import RedisCluster, RedisProcess, free_port


def test_a_port_is_never_handed_out_twice_even_before_it_is_bound():
    ports = [free_port() for _ in range(2_000)]
    assert len(set(ports)) == len(ports)


def test_a_redis_server_that_cannot_bind_fails_its_start_at_once_with_its_log(tmp_path):
    first = RedisProcess(tmp_path / "first")
    first.start()
    try:
        second = RedisProcess(tmp_path / "second")
        second.port = first.port  # taken
        began = time.monotonic()
        with pytest.raises(TimeoutError, match="exited") as failed:
            second.start()
        assert time.monotonic() - began < 10  # not the 30 s a slow start is given
        assert "Address already in use" in str(failed.value)
        assert second.process is None
    finally:
        first.close()


def test_a_port_held_by_a_stopped_server_fails_the_start_without_hanging(tmp_path):
    holder = RedisProcess(tmp_path / "holder")
    holder.start()
    holder.pause()  # accepts connections, answers nothing
    try:
        second = RedisProcess(tmp_path / "second")
        second.port = holder.port
        began = time.monotonic()
        with pytest.raises(TimeoutError, match="Address already in use"):
            second.start()
        assert time.monotonic() - began < 10
        assert second.process is None
    finally:
        holder.pause(False)
        holder.close()


def test_a_port_held_by_something_else_than_redis_fails_the_start_with_the_log(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        answering = threading.Thread(target=_answer_http, args=(listener,), daemon=True)
        answering.start()
        server = RedisProcess(tmp_path / "server")
        server.port = listener.getsockname()[1]
        with pytest.raises(TimeoutError, match="Address already in use"):
            server.start()
        assert server.process is None


def _answer_http(listener: socket.socket) -> None:
    """Answer whatever connects as a web server would, until the listener closes."""
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.recv(1024)
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_a_cluster_node_whose_port_was_taken_moves_to_another(tmp_path):
    blocker = RedisProcess(tmp_path / "blocker")
    blocker.start()
    cluster = RedisCluster(primaries=3, replicas=0)
    try:
        cluster.nodes[-1].port = blocker.port  # taken by another server since it was drawn
        cluster.start()
        assert cluster.nodes[-1].port != blocker.port
        with cluster.nodes[-1].client() as client:
            assert b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
    finally:
        cluster.close()
        blocker.close()


def test_a_cluster_that_fails_to_start_leaves_no_node_running(tmp_path):
    cluster = RedisCluster(primaries=3, replicas=0)
    (tmp_path / "a file").write_text("")
    cluster.nodes[-1].directory = tmp_path / "a file"  # cannot be its folder
    with pytest.raises(OSError):
        cluster.start()
    assert cluster.alive() == []
    assert all(not node.directory.exists() for node in cluster.nodes[:-1])
