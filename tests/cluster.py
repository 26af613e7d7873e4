"""Loopback clusters for the multi-worker tests: free ports, and workers launched with TF_CONFIG."""
import json
import socket
import subprocess


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch_workers(command, env: dict, count: int = 2) -> list[subprocess.Popen]:
    """`count` worker processes of a loopback cluster, worker i with TF_CONFIG naming it;
    `command` is the argv, or a function of the worker's index returning it."""
    cluster = [f"127.0.0.1:{port}" for port in free_ports(count)]
    workers = []
    for index in range(count):
        worker_env = {**env, "TF_CONFIG": json.dumps({"cluster": {"worker": cluster},
                                                      "task": {"type": "worker", "index": index}})}
        argv = command(index) if callable(command) else command
        workers.append(subprocess.Popen(argv, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
    return workers
