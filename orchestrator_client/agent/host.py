"""Who the agent is and what it reports about its host: a stable instance id, CPU and memory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import sys

_NAME_CHARS = re.compile(r"[^a-zA-Z0-9._-]")


def default_instance_id() -> str:
    """`<hostname>-<hash of the working directory and program>`: stable across restarts of the
    same program on the same host, so a restarted agent resumes its registration (and the work
    the server kept for it) instead of registering anew.

    Two processes of one agent on one host (same program, same directory) get the same id, and the
    second is refused while the first is alive (IDENTITY_IN_USE): give each its own `instance_id`.
    """
    program = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    digest = hashlib.sha256(f"{os.getcwd()}\0{program}".encode()).hexdigest()[:8]
    return _NAME_CHARS.sub("-", f"{socket.gethostname()}-{digest}")[:128]


def host_load() -> tuple[float, float]:
    """CPU (1-minute load average per core) and memory utilisation, both 0..1, without blocking."""
    cpu = 0.0
    memory = 0.0
    with contextlib.suppress(OSError, AttributeError, ValueError):
        cpu = min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    with contextlib.suppress(OSError, AttributeError, ValueError):
        total = os.sysconf("SC_PHYS_PAGES")
        available = os.sysconf("SC_AVPHYS_PAGES")
        if total > 0:
            memory = min(1.0, max(0.0, 1.0 - available / total))
    return cpu, memory
