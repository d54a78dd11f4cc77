"""Peak resident memory of this process."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak RSS in MB, from its own address space (VmHWM). ``ru_maxrss`` is not that: Linux carries
    the parent's peak into a child across fork and exec, so a child of a large benchmark process reported the
    parent's size (the 512 px rows of session 16 showed 13423 MB for every side)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # no /proc (not Linux): the kernel's own figure, with that caveat
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
