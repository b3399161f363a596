"""User-facing errors: each one becomes a single line on the command line, never a traceback."""


class FedsimError(Exception):
    """A mistake the user can fix (bad scenario, missing files, diverging run); printed as one line."""


class ScenarioError(FedsimError):
    """A scenario field is missing, unknown, of the wrong type or impossible; the message names the field."""


class DataError(FedsimError):
    """A data set cannot be built (missing files, impossible partition); the message names what is missing."""


class DivergenceError(FedsimError):
    """Training produced a non-finite loss or parameters; the message names the round."""


class UsageError(FedsimError):
    """The command line itself is malformed (argparse's complaint, as one line), or names no run to resume."""


class RunInterrupted(FedsimError):
    """The run received SIGINT or SIGTERM and stopped after saving a checkpoint; the exit status is 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
