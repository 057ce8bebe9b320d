"""Errors of the data pipeline: one line each, naming the bad value and what is allowed."""

from __future__ import annotations


class DataError(ValueError):
    """A bad data or tokenizer input; the message is one line the trainer prints as-is."""


class DataPathNotFoundError(DataError, FileNotFoundError):
    """A data path (file, directory, glob, tokens dir) that does not exist or matches nothing."""
