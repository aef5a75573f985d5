"""The ``caft-tl`` command: :mod:`~caft_tl.cli.app` builds the parser and runs a command;
:mod:`~caft_tl.cli.common` holds what the commands share; each other module is one command
group (``finetune``, ``directions``, ``diagnose``, ``crosscoder``, ``eval``, ``scale``)."""

from caft_tl.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
