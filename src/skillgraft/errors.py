"""The one exception type that the command line turns into `error: ...` and exit status 2."""

from __future__ import annotations


class SkillgraftError(Exception):
    """A user-facing failure: bad input, a mismatched pair, an unreachable checkpoint.

    The message is one line that says what is wrong and, where possible, what to do, in terms of
    the Python API. ``cli`` is the same message in terms of the command line (naming its flags);
    the command line prints it instead when given.
    """

    def __init__(self, message: str, *, cli: str | None = None):
        super().__init__(message)
        self.cli_message = cli

    def for_cli(self) -> str:
        return self.cli_message or str(self)
