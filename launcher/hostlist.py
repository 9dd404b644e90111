"""Slurm's compressed lists: host lists ('gpu[01-04,07],cpu5') and tasks per node ('2(x3),1')."""
from __future__ import annotations

import re

from launcher.errors import LaunchError


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host lists: 'gpu[01-04,07],cpu5' -> gpu01..gpu04, gpu07, cpu5.

    Handles zero padding, several bracket groups in one name ('r[1-2]n[1-2]') and plain names.
    """
    names: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        names.extend(_expand_one(item))
    if not names:
        raise LaunchError(f"cannot parse the Slurm node list {nodelist!r}")
    return names


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"unbalanced ']' in the Slurm node list {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise LaunchError(f"unbalanced '[' in the Slurm node list {text!r}")
    items.append("".join(current))
    return [i for i in items if i]


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    head, tail = item[: match.start()], item[match.end():]
    out = []
    for part in match.group(1).split(","):
        part = part.strip()
        if "-" in part:
            lo, _, hi = part.partition("-")
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise LaunchError(f"bad range {part!r} in the Slurm node list entry {item!r}")
            width = len(lo)
            values = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
        elif part.isdigit():
            values = [part]
        else:
            raise LaunchError(f"bad entry {part!r} in the Slurm node list entry {item!r}")
        for value in values:
            out.extend(_expand_one(head + value + tail))
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE form: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"cannot parse the Slurm tasks-per-node value {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts
