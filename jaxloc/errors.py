"""The one exception type for mistakes a user can fix (bad config, bad data, bad path).

Command-line entry points catch `UserError`, print its message on one line or a
few, and exit with status 2 instead of showing a traceback.
"""


class UserError(ValueError):
  """A problem with the user's input; the message says what is wrong and how to fix it."""
