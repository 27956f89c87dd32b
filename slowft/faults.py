"""Fault injection for the crash and disk-full tests.

``SLOWFT_FAULT=point:n:action`` makes the n-th (1-based) ``hit(point)`` of this process
SIGKILL the process (``kill``), send it SIGINT as Ctrl-C would (``sigint``) or raise ENOSPC
(``enospc``). Unset, ``hit`` is a string comparison.
"""
from __future__ import annotations

import errno
import os
import signal

_spec = os.environ.get("SLOWFT_FAULT", "")
_counts: dict[str, int] = {}
_point, _n, _action = (_spec.split(":") + ["", "", ""])[:3] if _spec else ("", "0", "")


def hit(point: str) -> None:
    if point != _point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != int(_n):
        return
    if _action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if _action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    if _action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
