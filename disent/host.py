"""What this host offers a run: free TCP ports (the one helper for the launcher's rendezvous,
single-process runs and the tests' servers) and the CPUs this process may use."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def free_ports(n: int, host: str = "127.0.0.1", below: int = 65536) -> list[int]:
    """n distinct ports the OS reports free on host ("" = every interface), each under `below`.

    All are held open until all are found, so the OS cannot hand out one port twice. Another
    process may still take one before the caller binds it; callers that start servers retry.
    """
    sockets, ports = [], []
    try:
        while len(ports) < n:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            if port < below:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)
