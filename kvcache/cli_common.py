"""What every ``kvcache`` command shares: the click group and the error and report plumbing.

The group (:data:`cli`), the exit codes, the error guard that turns every failure into
one line on stderr (:func:`guard`, :func:`fail`), ``--json`` (:func:`reporting`,
:func:`print_json`), the terminal-only progress bar (:class:`Bar`) and the small text
formatters the reports use. The commands live in :mod:`kvcache.cli_maint` and
:mod:`kvcache.cli_build`; :mod:`kvcache.cli` registers them and holds ``main``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable

import click

from .errors import CacheExistsError, IncompatibleCacheError, KvCacheError, NotACacheError, PartialCacheError

__all__ = ["EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE", "KEY_HELP", "Bar", "cli", "fail", "guard",
           "human_size", "print_json", "reporting", "short_list"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def fail(exc: BaseException | str, code: int) -> None:
    """Print ``exc`` as one ``kvcache: error:`` line on stderr and exit with ``code``."""
    line = " ".join(str(exc).split())  # one line, whatever the message held
    click.echo(f"kvcache: error: {line}", err=True)
    sys.exit(code)


def guard(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (NotACacheError, IncompatibleCacheError, CacheExistsError, PartialCacheError) as exc:
            fail(exc, EXIT_USAGE)
        except KvCacheError as exc:
            fail(exc, EXIT_PROBLEMS)
        except ValueError as exc:  # a malformed SPEC and the like
            fail(exc, EXIT_USAGE)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own: usage errors and the like, already one line
        except OSError as exc:  # permissions, a read-only filesystem, a full disk
            fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
                 + f" ({type(exc).__name__})", EXIT_PROBLEMS)
        except Exception as exc:  # noqa: BLE001 - e.g. the SPEC's own code: one line, no traceback
            if os.environ.get("KVCACHE_DEBUG"):
                raise
            fail(f"{type(exc).__name__}: {exc} (KVCACHE_DEBUG=1 shows the traceback)", EXIT_PROBLEMS)

    return wrapper


def reporting(fn: Callable) -> Callable:
    """``--json`` and the error guard: what every reporting command has."""
    return click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")(guard(fn))


def print_json(report: Any, **extra: Any) -> None:
    """Print a report (a dataclass or a mapping), plus ``extra`` fields, as indented JSON."""
    d = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(report)
    d.update(extra)
    click.echo(json.dumps(d, indent=2, default=str))


class Bar:
    """A click progress bar on a terminal; nothing otherwise (or with --json)."""

    def __init__(self, label: str, enabled: bool, unit: str = "items") -> None:
        self.label, self.unit = label, unit
        self.enabled = enabled and sys.stderr.isatty()
        self.bar: Any = None
        self.shown = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr,
                                         show_eta=True, show_pos=True,
                                         item_show_func=lambda _x: self._rate())
            self.bar.__enter__()
            self.t0 = time.perf_counter()
        step, self.shown = done - self.shown, done  # the rate shown below reads self.shown
        self.bar.update(step)

    def _rate(self) -> str:
        dt = time.perf_counter() - getattr(self, "t0", time.perf_counter())
        return f"{self.shown / dt:,.0f} {self.unit}/s" if dt > 0 else ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def arg(self) -> Any:
        return self if self.enabled else False


def human_size(n: int | None) -> str:
    """``12.3 MiB (12,897,484 B)``; ``-`` for unknown."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:,} B"
    x = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        x /= 1024
        if abs(x) < 1024 or unit == "TiB":
            break
    return f"{x:,.1f} {unit} ({n:,} B)"


def short_list(xs: list[int], n: int = 20) -> str:
    """The first ``n`` of ``xs``, comma-separated, and how many more there are."""
    s = ", ".join(map(str, xs[:n]))
    return s + (f", ... ({len(xs) - n} more)" if len(xs) > n else "")


KEY_HELP = ("The key function of a keyed cache (key=): the source's attribute NAME (e.g. `key` "
            "for source.key), or a module:callable returning the key function.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvcache", prog_name="kvcache")
def cli() -> None:
    """Inspect and maintain kvcache caches (LMDB caches of PyTorch datasets).

    Exit codes: 0 ok, 1 problems found, 2 usage error or not a cache, 130 a build
    interrupted by Ctrl-C (run it again to resume).
    """
