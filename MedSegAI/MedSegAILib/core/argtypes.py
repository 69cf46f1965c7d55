"""Checked ``argparse`` argument types shared by the ``medsegai`` command and the training commands."""

from __future__ import annotations

import argparse
from typing import Any, Callable

__all__ = ["number_type"]


def number_type(convert: Callable[[str], float], minimum: float, below: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses with ``convert`` and checks ``minimum <= value (< below)``."""
    kind = "a whole number" if convert is int else "a number"
    bound = f"in [{minimum:g}, {below:g})" if below is not None else f"≥ {minimum:g}"

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected {kind} {bound}, not {text!r}") from e
        if value < minimum or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"expected {kind} {bound}, not {value}")
        return value

    return parse
