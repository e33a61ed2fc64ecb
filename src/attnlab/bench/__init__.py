"""attnlab bench: speed, peak memory and scaling of the fast paths, next to the peers.

``attnlab bench run SUITE`` (or :func:`run_suite` with :func:`workloads`) measures every
contestant of a workload in one fresh process, interleaved round by round, and writes JSON,
Markdown and log-log plots. See ``docs/bench.md``.
"""

from attnlab.bench.report import markdown, update_readme, write_outputs
from attnlab.bench.runner import run_suite
from attnlab.bench.suites import GROUPS, SUITES, TARGETS, workloads
from attnlab.bench.workload import Workload

__all__ = ["GROUPS", "SUITES", "TARGETS", "Workload", "markdown", "run_suite",
           "update_readme", "workloads", "write_outputs"]
