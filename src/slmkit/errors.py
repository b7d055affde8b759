"""The one exception type for user mistakes: the CLI prints it as a single line and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, wrong checkpoint): never shown as a traceback."""


class Interrupted(UserError):
    """Training stopped by SIGINT or SIGTERM after saving a consistent checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
