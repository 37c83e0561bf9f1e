"""Exceptions shared by the configuration loader and the policy table parser."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration or table error that names the file, the line and the key.

    ``str()`` gives the one line an admin needs, in the shape compilers use: ``FILE:LINE: KEY: message``.
    """

    def __init__(self, filename: str, line: int | None, key: str | None, message: str) -> None:
        self.filename = filename
        self.line = line
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.filename if self.line is None else f"{self.filename}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
