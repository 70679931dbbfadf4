"""Argument types and checks shared by the command line's subcommands.

A bad value is a usage error (argparse prints the usage and exits with status 2) whose message
names the argument, the accepted values and what was given: never a traceback from deep inside
a model or a data loader. argparse prefixes a type's message with "argument --name:".
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Sequence


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected an integer >= %d, got %r" % (low, text)) from None
        if value < low:
            raise argparse.ArgumentTypeError("expected an integer >= %d, got %d" % (low, value))
        return value
    parse.__name__ = "integer >= %d" % low
    return parse


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval [low, high] (either end open as asked; inf = unbounded)."""
    span = "%s%g, %g%s" % ("(" if low_open else "[", low, high, ")" if high_open else "]")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = (math.isfinite(value) and (value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError("expected a finite number in %s, got %r" % (span, text))
        return value
    parse.__name__ = "number in %s" % span
    return parse


positive_float = float_in(0.0, math.inf, low_open=True, high_open=True)
non_negative_float = float_in(0.0, math.inf, high_open=True)


def check_heads_divide(parser: argparse.ArgumentParser, heads: int, embed_dim: int) -> None:
    """--heads must divide --embed-dim (each head gets embed_dim / heads dimensions)."""
    if embed_dim % heads:
        parser.error("argument --heads: must divide --embed-dim %d (accepted: %s), got %d"
                     % (embed_dim, ", ".join(str(h) for h in divisors(embed_dim)), heads))


def divisors(n: int) -> Sequence[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_writable_file(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    """`path` can be created or overwritten: its folder exists (or can be made) and is writable,
    and it is not a folder itself."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error("argument %s: expected a file path, got the folder %r" % (option, path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        parser.error("argument %s: cannot create the folder %r (%s)" % (option, folder, e.strerror or e))
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        parser.error("argument %s: %r is not writable" % (option, path))
