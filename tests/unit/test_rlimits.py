"""A node raises its open files limit at start (rlimits.py)."""

from __future__ import annotations

import resource
import subprocess
import sys


def test_the_soft_limit_is_raised_to_the_hard_limit_which_stays() -> None:
    """A process started with a soft limit of 256 ends with soft = hard; the hard limit
    is not changed (lowering it could not be undone)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = ("import resource; from mailgate.rlimits import raise_open_files_limit as r; "
            "print(r(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    returned, soft, new_hard = (int(x) for x in out.stdout.split())
    assert new_hard == hard
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert returned == soft == expected
