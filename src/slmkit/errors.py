"""The one exception type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, wrong checkpoint): never shown as a traceback."""
