"""Peak RSS of a `distill` command run in a subprocess: what the memory benchmarks measure.

``WRAPPER`` runs ``python -m distill.cli ARGS`` and, at exit, writes to the file named by
``$DISTILL_BENCH_RSS`` the process's peak resident memory and its children's (its
DataLoader workers'), in kB. The process's own figure is ``VmHWM`` from ``/proc/self/status``
where there is one (Linux): ``ru_maxrss`` keeps, across ``execve``, the peak of the process
that started it, so a command started by a large benchmark process would report that
process's size instead of its own. Elsewhere it is ``ru_maxrss``.
"""

import json
import os
import subprocess
import sys

WRAPPER = """
import atexit, json, os, resource, runpy, sys
def _own_peak_kb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def _peak():
    with open(os.environ["DISTILL_BENCH_RSS"], "w") as f:
        json.dump({"self_kb": _own_peak_kb(),
                   "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
atexit.register(_peak)
sys.argv = ["distill", *sys.argv[1:]]
runpy.run_module("distill.cli", run_name="__main__")
"""


def peak_rss_mb(args: list[str], report: str) -> tuple[float, float]:
    """Run ``distill ARGS`` under ``WRAPPER``; (its own peak RSS, its children's) in MB.

    ``report``: a file path for the wrapper's figures. A failed command raises RuntimeError
    with the end of its stderr."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], env=dict(os.environ, DISTILL_BENCH_RSS=report),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"distill {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with open(report) as f:
        rss = json.load(f)
    return rss["self_kb"] / 1024, rss["children_kb"] / 1024
