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


class MissingInputError(RetuneError, FileNotFoundError):
    """A stage's input is not there: the stage that writes it has not run (the message says
    which). Also a FileNotFoundError, for callers that treat a missing file as "none yet"."""

    def __init__(
        self, path: object, written_by: str | None = None, setting: str | None = None
    ) -> None:
        command = {"promote": "gate"}.get(written_by or "", written_by)
        stage = f"the `{written_by}` stage (`retune {command}`)" if written_by else "the stage"
        where = f" ({setting})" if setting else ""
        self.message = (
            f"{path}{where} is missing: run {stage} that writes it first, or `retune run` for "
            "the whole pipeline in order"
        )
        super().__init__(self.message)
        self.filename = str(path)

    def __str__(self) -> str:
        return self.message
