"""Kept so that ``from imagesamples import ...`` in test modules still works: the samples
live in ``testkit.images``, shared with the benchmarks."""

from testkit.images import *  # noqa: F403
