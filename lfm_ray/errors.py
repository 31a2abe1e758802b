"""The one exception type for mistakes a user can make.

Everything that a user can cause (an unknown name, a missing file, a bad value) raises
`LfmError` with a message that names the input and says what would be accepted. The CLI
prints the message without a traceback and exits with status 2.
"""


class LfmError(ValueError):
    """A user-facing error: the message alone tells what was wrong and how to fix it."""


def unknown_name(kind: str, name: object, known: "list[str] | tuple[str, ...]") -> LfmError:
    """The error for a name that is not in a registry."""
    return LfmError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
