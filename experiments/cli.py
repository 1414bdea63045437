"""Runs an experiment script's `main` so that mistakes end in one clear line, exit status 2.

Library INFO logs (Orbax, jax, TensorFlow) are off unless `--verbose` is given, and so are
Orbax's late tracebacks of a checkpoint read or write that already failed. XLA's
persistent compilation cache is on (`--compilation_cache`, default ~/.cache/jaxloc/xla):
a program compiled once, by any script, is read back instead of compiled again.
Flag and config-override errors (an unknown field, a misspelt override, a bad
value, a missing config file) and `jaxloc.errors.UserError` are printed as
`error: ...` without a traceback; `jaxloc.errors.Stopped` (training stopped by SIGTERM or
SIGINT, its checkpoint saved) prints its line and exits 143 or 130. A script ends without
the interpreter's teardown of every library object (`_exit`), about a second sooner.
"""

import ast
import atexit
import gc
import logging as std_logging
import os
import re
import signal
import sys
import threading
import traceback

import jax
from absl import app, flags, logging

import experiments
from jaxloc import console
from jaxloc.errors import Stopped, UserError

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the INFO logs of Orbax, jax and TensorFlow.")
_CACHE = flags.DEFINE_string(
  "compilation_cache",
  os.path.join("~", ".cache", "jaxloc", "xla"),
  "XLA's persistent compilation cache: compiled programs kept here, so a second run of the "
  "same shapes skips compiling. '' turns it off; $JAX_COMPILATION_CACHE_DIR, when set, wins.",
)


def use_compilation_cache(path: str) -> None:
  """Keeps every compiled program in `path` (none too small or too quick to keep)."""
  if not path or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def write_json(path: str, figures) -> None:
  """A script's figures as JSON at `path` (its --out), the folder made if it is missing."""
  from jaxloc import workdir

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  workdir.write_json(path, figures)


def _fail(message: str) -> None:
  """Prints the error line and exits 2. What libraries print to stderr while the interpreter
  shuts down after it is dropped (Orbax reports the tasks of a failed write, with their
  tracebacks, when they are collected): the error line is the last word."""
  print(f"error: {message}", file=sys.stderr)
  sys.stderr.flush()
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  sys.exit(2)


def log_late_checkpoint_reports() -> None:
  """Orbax's late reports of a checkpoint operation that already failed (a damaged
  checkpoint passed over on resume: `checkpoint.late_report`) are logged at INFO instead of
  printed as tracebacks after the one line that said what happened: the exceptions Python
  could not raise (`sys.unraisablehook`) and the asyncio tasks whose exception nobody
  retrieved (the asyncio logger). Every other one is printed as Python prints it."""
  printed = sys.unraisablehook

  def logged(e) -> bool:
    from jaxloc import checkpoint  # Orbax is imported by what checkpoints, not by every command

    if not checkpoint.late_report(e):
      return False
    text = "".join(traceback.format_exception(e))
    logging.info("a failed checkpoint operation's late report:\n%s", text)
    return True

  def hook(unraisable):
    if not logged(unraisable.exc_value):
      printed(unraisable)

  sys.unraisablehook = hook
  std_logging.getLogger("asyncio").addFilter(
    lambda record: not (record.exc_info and logged(record.exc_info[1]))
  )


def _with_log_level(main):
  """`main`, with library logs set after app.run has set up absl logging."""

  def run_main(argv):
    console.quiet_library_logs(_VERBOSE.value)
    log_late_checkpoint_reports()
    use_compilation_cache(_CACHE.value)
    return main(argv)

  return run_main


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` into `flag_values`; returns the arguments left. A flag or config-override
  mistake (an unknown field, a misspelt override, a bad value, a missing or broken config
  file) is one UserError."""
  try:
    rest = flag_values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", " ").replace("\\'", "'").replace('\\"', '"')
    if isinstance(e, AttributeError):  # ml_collections: an override names no config field
      name = re.findall(r"[A-Za-z_][\w.]*", text)[0]
      hint = text[text.find("Did you mean") :].rstrip("'") if "Did you mean" in text else ""
      text = f"unknown config field {name!r}. {hint}"
    raise UserError(f"{text}\nrun with --helpshort to see the flags") from None
  if "config" in flag_values:
    try:  # a config file is loaded lazily: make a missing or broken one fail here
      flag_values.config.to_dict()
    except OSError as e:
      path = flag_values["config"].config_filename
      raise UserError(f"cannot load --config={path}: {e.__cause__ or e}") from None
  return rest


def run(main) -> None:
  """Parses flags, then calls `main(argv)`; user errors exit with status 2. The process ends
  as `sys.exit` would, without the interpreter's teardown (`_exit`)."""
  if experiments.GC_PAUSED:  # paused for the command's imports (experiments/__init__.py)
    gc.freeze()
    gc.enable()
  try:
    _run(main)
  except SystemExit as e:
    _exit(e.code)
  _exit(0)


def _exit(code) -> None:
  """`sys.exit(code)` less the interpreter's teardown, which frees every object of jax, XLA
  and the libraries one by one (about 0.9 s of CPU after a short training run, each command
  of the test suite paying it). The steps of the interpreter's exit before that teardown, in
  its order: the threads' exit (thread pools told to stop, the other threads joined), the
  exit handlers (TensorBoard's writer, logging); then stdout and stderr flushed, `os._exit`.
  A SIGINT or SIGTERM during these steps (a second Ctrl-C after a stop, say) ends the process
  at once with the same status, instead of a traceback from the exit handler it interrupts."""
  message = None if code is None or isinstance(code, int) else code  # sys.exit("text")
  status = 1 if message is not None else code or 0

  def now(signum, frame):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

  if threading.current_thread() is threading.main_thread():
    for s in (signal.SIGINT, signal.SIGTERM):
      signal.signal(s, now)
  threading._shutdown()
  atexit._run_exitfuncs()
  if message is not None:
    print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def _run(main) -> None:
  try:
    argv = parse_flags(sys.argv)
  except UserError as e:
    _fail(str(e))
  try:
    app.run(_with_log_level(main), argv=argv)
  except UserError as e:
    _fail(str(e))
  except Stopped as e:
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_status)


def override(config, assignments: list[str]) -> None:
  """`--set field=value` items applied to `config`; a field that is not there, or a value of
  the wrong type, is a UserError."""
  for item in assignments:
    name, sep, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare string
    parent, _, field = name.rpartition(".")
    node = config
    for part in filter(None, parent.split(".")):
      node = node.get(part)
    if not sep or node is None or field not in node:
      raise UserError(f"--set {item!r}: expected field=value with an existing config field")
    try:
      node[field] = value
    except TypeError as e:
      raise UserError(f"--set {item!r}: {e}") from None
