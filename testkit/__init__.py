"""Helpers shared by the tests and the benchmarks; a development tool, not in the wheel.

- ``testkit.server``: start a real ``python -m service`` on 127.0.0.1 and stop it gracefully.
- ``testkit.images``: real image files (and crafted bad ones) as bytes.
- ``testkit.fashion``: the embedded model's test set (images, true labels), read once.
- ``testkit.processes``: a process tree's pids, per-process peak RSS and CPU time (/proc).
- ``testkit.sessions``: reference ONNX Runtime CPU sessions, op library registered.
- ``testkit.waiting``: ``eventually``, polling for what a real process does in its own time.
"""
