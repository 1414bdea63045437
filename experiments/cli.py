"""Runs an experiment script's `main` so that mistakes end in one clear line, exit status 2.

Flag and config-override errors (an unknown field, a misspelt override, a bad
value, a missing config file) and `jaxloc.errors.UserError` are printed as
`error: ...` without a traceback.
"""

import re
import sys

from absl import app, flags

from jaxloc.errors import UserError


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run(main) -> None:
  """Parses flags, then calls `main(argv)`; user errors exit with status 2."""
  try:
    argv = flags.FLAGS(sys.argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", " ").replace("\\'", "'").replace('\\"', '"')
    if isinstance(e, AttributeError):  # ml_collections: an override names no config field
      name = re.findall(r"[A-Za-z_][\w.]*", text)[0]
      hint = text[text.find("Did you mean") :].rstrip("'") if "Did you mean" in text else ""
      text = f"unknown config field {name!r}. {hint}"
    _fail(f"{text}\nrun with --helpshort to see the flags")
  if "config" in flags.FLAGS:
    try:  # a config file is loaded lazily: make a missing or broken one fail here
      flags.FLAGS.config.to_dict()
    except OSError as e:
      _fail(f"cannot load --config={flags.FLAGS['config'].config_filename}: {e.__cause__ or e}")
  try:
    app.run(main, argv=argv)
  except UserError as e:
    _fail(str(e))
