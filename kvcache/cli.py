"""The ``kvcache`` command: a thin click layer over :mod:`kvcache.maintenance`.

Exit codes: 0 ok; 1 problems found (bad records, a busy or damaged cache, a source that
raised, a permission or other OS error, any other error); 2 usage error or a path that
is not a cache (or of another format, a publish destination that exists without
--force, a partial cache published without --partial); 130 a build interrupted by Ctrl-C.
Every reporting command takes ``--json``. Every error is one line on stderr, never a
traceback (``KVCACHE_DEBUG=1`` shows the traceback of an unexpected one).

This module is the entry point: the group :data:`cli` (from :mod:`kvcache.cli_common`,
with the shared error and report plumbing), the commands registered on it by importing
:mod:`kvcache.cli_maint` (inspect, get, verify, compact, gc) and :mod:`kvcache.cli_build`
(build, merge, publish, stage), and :func:`main`.
"""

from __future__ import annotations

from typing import Any

import click

from . import cli_build, cli_maint
from .cli_common import cli

__all__ = ["cli", "main"]

# Importing the command modules registers their commands on the group.
COMMAND_MODULES = (cli_maint, cli_build)


def _warning_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    text = " ".join(str(message).split())
    click.echo(f"kvcache: warning: {text.removeprefix('kvcache: ')}", err=True)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the ``kvcache`` console script and ``python -m kvcache``."""
    import warnings

    warnings.showwarning = _warning_line  # one line each, like errors (this process is ours)
    return cli.main(args=argv, prog_name="kvcache")


if __name__ == "__main__":
    main()
