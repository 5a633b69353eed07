"""Batch scoring client for the seresnet-serve HTTP API (docs/design.md §5, §5b).

``python -m client score PATH... --url URL`` streams image paths from files, folders and
``@list`` files, sends them in multi-image requests over a few keep-alive connections, and writes
one result row per image, resumably. It knows only HTTP: nothing here imports the service, the
exporter or an inference runtime.
"""
