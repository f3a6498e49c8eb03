"""Errors for bad or missing data; the tools print their message as one line instead of a traceback."""

from __future__ import annotations

__all__ = ["DatasetError", "DatasetNotFoundError"]


class DatasetError(RuntimeError):
    """Bad data: the message names the file and what is wrong with it."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """Missing data: the message names the path that was looked in and how to fix it."""
