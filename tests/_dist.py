"""Two-rank gloo harness shared by the data-parallel tests."""

import multiprocessing
import socket


def run_two_ranks(worker, *args, timeout: float = 120) -> None:
    """Fork two gloo ranks calling ``worker(rank, 2, port, *args)`` on a free localhost port
    (fork: no second torch import); a rank that hangs is killed and fails the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=worker, args=(rank, 2, port, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
