"""The exceptions that end a command without a traceback.

Command-line entry points catch `UserError`, print its message on one line or a
few, and exit with status 2; `Stopped` (a run stopped by a signal after saving) prints
its one line and exits with the shell's status for that signal (143 SIGTERM, 130 SIGINT).
"""


class UserError(ValueError):
  """A problem with the user's input; the message says what is wrong and how to fix it."""


class Stopped(Exception):
  """Training stopped by a signal, its checkpoint saved; `exit_status` = 128 + signal."""

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status
