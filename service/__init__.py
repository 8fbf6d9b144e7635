"""The serving side of imgclf: the gRPC/HTTP server, its SDK, and offline batch scoring."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imgclf")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
