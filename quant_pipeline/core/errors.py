"""One error type for bad input, so every entry point can print it as one line and stop.

Bad input must be reported before heavy work starts and must name the thing and the fix;
raising this (and nothing else) for user mistakes keeps tracebacks for real bugs.
"""


class AuditInputError(ValueError):
    """A user-supplied input (file, field, recipe) is unusable. The message says what and how to fix it."""


# What a `quant-pipeline` exit status means: the audit passed (or a verb was done), a stage crashed,
# bad input was refused (an AuditInputError), the audit completed with a FAIL or INCOMPLETE verdict.
EXIT_PASSED, EXIT_CRASHED, EXIT_BAD_INPUT, EXIT_GATE_FAILED = 0, 1, 2, 3
