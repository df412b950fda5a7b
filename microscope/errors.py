"""Exceptions of the suite: each names the bad input and says how to fix it."""

from __future__ import annotations


class MicroscopeError(Exception):
    """Base class of the suite's own errors."""


class ModelNotFoundError(MicroscopeError, FileNotFoundError):
    """A model name or directory that cannot be found, or whose files are missing or corrupt."""
