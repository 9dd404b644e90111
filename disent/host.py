"""What this host offers a run: free TCP ports (the one helper for the launcher's rendezvous,
single-process runs and the tests' servers), the CPUs this process may use, and whether the `launcher`
package it would run is disent's."""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
from importlib.machinery import PathFinder
from importlib.metadata import packages_distributions
from pathlib import Path

from disent.errors import InputError

LAUNCHER_MARKER = 'DISTRIBUTION = "disent-adversarial"'  # a line of launcher/__init__.py


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


def check_launcher() -> None:
    """Refuse (InputError) when `python -m launcher` started from here would not run disent's launcher.

    Another distribution may install a top-level `launcher` too: pip overwrites the shared files without a
    warning, and one in site-packages wins over an editable install of disent (whose finder comes last).
    The file is read, not imported: disent never imports the launcher, and a foreign one would run here."""
    # `python -m` puts the working directory first on the child's path.
    spec = PathFinder.find_spec("launcher", [os.getcwd(), *sys.path]) or importlib.util.find_spec("launcher")
    origin = spec.origin if spec is not None and spec.has_location else None
    try:
        ours = origin is not None and LAUNCHER_MARKER in Path(origin).read_text(errors="replace")
    except OSError:
        ours = False
    if ours:
        return
    if spec is None:
        raise InputError("no `launcher` package is importable here: reinstall disent-adversarial, which ships it")
    if origin is None:  # uninstalling another `launcher` took the __init__.py both had written
        raise InputError(f"the `launcher` package at {', '.join(spec.submodule_search_locations or [])} has lost "
                         "its __init__.py (another distribution's uninstall removed it): reinstall disent-adversarial")
    others = sorted(set(packages_distributions().get("launcher", [])) - {"disent-adversarial"})
    raise InputError(f"`python -m launcher` would run {origin}, not disent's launcher; "
                     + (f"{', '.join(others)} also installs a top-level `launcher`: " if others else "")
                     + "uninstall the other `launcher`, then reinstall disent-adversarial (docs/launch.md, "
                     "\"The name `launcher`\")")
