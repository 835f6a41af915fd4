class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits non-zero."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm became non-finite; the last good checkpoint is kept."""


class Interrupted(Exception):
    """A signal (SIGINT, SIGTERM) stopped the run after a checkpoint was written; the CLI exits
    with 128 + the signal number, as a shell does."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
