"""One error type for bad input, so every entry point can print it as one line and stop.

Bad input must be reported before heavy work starts and must name the thing and the fix;
raising this (and nothing else) for user mistakes keeps tracebacks for real bugs.
"""


class AuditInputError(ValueError):
    """A user-supplied input (file, field, recipe) is unusable. The message says what and how to fix it."""
