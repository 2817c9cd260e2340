"""The one exception type for bad input the user can fix."""


class UserError(Exception):
    """Bad input the user can fix (a missing file, a mismatched checkpoint, an unsupported flag).

    The message is a single line that says what is wrong and what to do about it; the command-line
    scripts print it as `error: <message>` and exit with status 2.
    """
