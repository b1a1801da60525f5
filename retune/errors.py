"""Errors a user can act on: each message names the file, setting or fix."""

from __future__ import annotations


class RetuneError(RuntimeError):
    """Base of retune's user-facing errors; the CLI prints the message without a traceback."""


class IngestError(RetuneError):
    """The incoming data cannot be read at all (no files, unknown table layout, ...)."""


class DataValidationError(RetuneError):
    """The prepared data broke the data contract; training must not start."""


class BaseModelError(RetuneError):
    """`train.base_model` names something that cannot be loaded."""
