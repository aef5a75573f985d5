"""Errors for input the caller can fix, by the built-in type a Python user expects.

A missing hook or column is a ``KeyError`` and a direction index out of range an
``IndexError``, as for a dict or a list; these subclasses are also ``ValueError`` s, so
code that treats bad input as ``ValueError`` (the ``caft-tl`` command prints those as one
line) catches them, while a bare ``KeyError`` from a bug keeps its traceback."""

from __future__ import annotations


class InputKeyError(KeyError, ValueError):
    """A key the caller named (a hook, a column, a direction set) is not there."""

    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return str(self.args[0]) if self.args else ""


class InputIndexError(IndexError, ValueError):
    """An index the caller gave (a direction, a latent) is out of range."""
