"""Free TCP ports, the one helper for the launcher's rendezvous, single-process runs and the tests' servers."""
from __future__ import annotations

import socket


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
