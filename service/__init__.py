"""seresnet-serve's online side: ``python -m service`` (see :mod:`service.supervisor`)."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("seresnet-serve")
except PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0.0.0"
