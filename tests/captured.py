"""What a command printed itself, out of a pytest capture that Ray and logging also write to.

Two kinds of text reach a test's capture without coming from the command under test:
- lines Ray forwards from trial processes (prefixed `(trial_driver pid=N)`, `(pid=N)`, ...):
  Ray forwards them asynchronously, so an earlier run's processes (the module shares one Ray
  instance) may print into a later test's capture;
- "--- Logging error ---" blocks: a logging handler bound to an earlier test's capture stream,
  closed since, reports its failed write on the current stderr.
The checks of a command's own messages (one line, no traceback) read what is left."""

from __future__ import annotations

import re

# Ray's prefix of a forwarded line, with or without its colour codes.
FORWARDED = re.compile(r"^(\x1b\[\d+m)?\((\w+ )?pid=\d+(, ip=[\d.]+)?\)")


def without_logging_errors(text: str) -> str:
    """`text` without "--- Logging error ---" blocks (up to their "Arguments:" line)."""
    out, in_block = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("--- Logging error ---"):
            in_block = True
        elif in_block:
            in_block = not line.startswith("Arguments:")
        else:
            out.append(line)
    return "".join(out)


def own_text(text: str) -> str:
    """`text` without "--- Logging error ---" blocks and Ray-forwarded lines."""
    return "".join(line for line in without_logging_errors(text).splitlines(keepends=True)
                   if not FORWARDED.match(line))
