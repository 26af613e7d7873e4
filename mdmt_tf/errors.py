"""User-facing errors.

Everything a user can get wrong (a spec, a data file, a flag) raises a subclass of
`MdmtError` whose message names the thing received and what would be valid. The CLI
prints that message on one line and exits with status 2; it never shows a traceback
for these.
"""
from __future__ import annotations


class MdmtError(Exception):
    """Base class of the errors caused by user input."""


class SpecError(MdmtError, ValueError):
    """A dataset spec (YAML or dataclass) is invalid."""


class ConfigError(MdmtError, ValueError):
    """A model / training / pipeline configuration value is invalid."""


class DataError(MdmtError, ValueError):
    """A data file does not match its spec.

    `source` is the file (or split) name, `row` the 1-based line number in a CSV file
    (the header is line 1) or the 1-based record number in a TFRecord file, and
    `column` the offending column / feature.
    """

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 column: str | None = None):
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
        self.source, self.row, self.column = source, row, column
