"""Entry-point plumbing: user errors become one line on stderr and exit status 2."""
from __future__ import annotations

import argparse
import sys

from .errors import SlowftError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2 like every other bad input. No
    abbreviated flags: --step would silently be --steps, and not count as given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise SlowftError(message)


def run(main) -> None:
    try:
        code = main()
    except SlowftError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)


def parse_size(text: str, flag: str = "--ram-budget") -> int:
    """'8G', '512M', '2TB', '0' -> bytes (a bare number is GB)."""
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1e9)
    except ValueError:
        raise SlowftError(f"{flag} {text}: expected a size such as 8G, 512M, 2TB or 0") from None
    if not 0 <= value < float("inf"):
        raise SlowftError(f"{flag} {text}: expected a size such as 8G, 512M, 2TB or 0")
    return int(value)
