"""Kept so that ``from serverutil import ...`` in test modules still works: the launcher
lives in ``testkit.server``, shared with the benchmarks."""

from testkit.server import *  # noqa: F403
from testkit.server import EMBEDDED_MODEL, REPO_ROOT  # noqa: F401
