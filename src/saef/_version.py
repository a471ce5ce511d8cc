"""The version of saef (read by the package root and by the run records)."""

__version__ = "0.2.0"
