"""The experiment commands (`python -m experiments.<command>`), their configs and benchmarks.

A command's start: Python sets `sys.argv[0]` to "-m" while it finds the command's module,
which is when this package is imported. The garbage collector then waits while jax, flax
and orbax load (each of their many objects would be scanned again and again), and `cli.run`
moves what they made out of its view (`gc.freeze`) and turns it back on (docs/speed.md, "The
run around the steps", has the figure). Imported any other way, this package changes nothing.
"""

import gc
import sys

GC_PAUSED = sys.argv[:1] == ["-m"] and gc.isenabled()
if GC_PAUSED:
  gc.disable()
