"""Stopping a run cleanly on SIGTERM or SIGINT (preemption, a scheduler's time limit,
Ctrl-C): the run saves a checkpoint at the step it reached and exits 143 or 130, so
that the same command resumes it exactly.

While `Signals` is entered, SIGTERM and SIGINT only set a flag (a second signal
during the save is ignored: SIGKILL still stops at once). The training loop asks
`poll()` before each compiled call and `agree()` at each logged step:

- one process: both answer the flag, so the run stops after the call in flight;
- several processes (`jax.distributed`): `poll()` answers False and `agree()` gathers
  every process's flag (one small all-gather per logged step), so all of them stop at
  the same logged step, and a signal to any one of them is enough.
"""

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxloc.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Signals:
  """A context manager that turns SIGTERM / SIGINT into a request to stop (see above).

  Handlers can only be set from the main thread; elsewhere the signals keep their
  handlers and `poll` / `agree` answer False unless `request` is called.
  """

  def __init__(self):
    self.received: int | None = None  # the signal number that asked to stop
    self._previous = {}

  def __enter__(self) -> "Signals":
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    self.request(signum)

  def request(self, signum: int) -> None:
    """Asks the run to stop as if signal `signum` had arrived (the first request counts)."""
    if self.received is None:
      self.received = int(signum)

  def poll(self) -> bool:
    """Stop before the next compiled call? (Several processes wait for `agree`.)"""
    return jax.process_count() == 1 and self.received is not None

  def agree(self) -> bool:
    """Stop at this logged step? With several processes, True on all when any got a signal."""
    if jax.process_count() == 1:
      return self.received is not None
    # Decided on what was gathered only: a signal that lands during the gather (its handler
    # runs after it) is sent at the next one, so every process answers alike.
    top = int(np.max(multihost_utils.process_allgather(np.int32(self.received or 0))))
    if top and self.received is None:
      self.received = top
    return top > 0

  def stopped(self, step: int, total: int) -> Stopped:
    """The exception that ends the run, once its checkpoint of `step` is saved."""
    name = signal.Signals(self.received).name
    return Stopped(
      f"stopped by {name} at step {step} of {total}; run the same command to resume",
      128 + self.received,
    )
