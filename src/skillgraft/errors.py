"""The one exception type that the command line turns into `error: ...` and exit status 2."""


class SkillgraftError(Exception):
    """A user-facing failure: bad input, a mismatched pair, an unreachable checkpoint.

    The message is one line that says what is wrong and, where possible, what to do.
    """
