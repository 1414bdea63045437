"""The XLA:CPU flags jaxloc sets, in `XLA_FLAGS`, when it is imported (before JAX starts a
backend, which is when XLA reads them).

`--xla_cpu_prefer_vector_width=512`: XLA:CPU's fused loops vectorised with 512-bit registers
where the CPU has AVX-512 (XLA prefers 256 bits); LLVM keeps to the widest the CPU has
otherwise. The seed model trains faster on the AVX-512 machines measured, with bit-identical
parameters (docs/speed.md has the figures and their commands).

A flag already in the user's `XLA_FLAGS` wins: `XLA_FLAGS=--xla_cpu_prefer_vector_width=256`
turns this one off. Where JAX's backends already started (code that ran a JAX computation
before importing jaxloc) the flags have no effect, and change nothing else.
"""

import os

CPU_FLAGS = ("--xla_cpu_prefer_vector_width=512",)


def with_cpu_flags(xla_flags: str, flags: tuple[str, ...] = CPU_FLAGS) -> str:
  """`xla_flags` (the value of XLA_FLAGS) with each of `flags` it does not set."""
  name = lambda flag: flag.split("=", 1)[0]
  given = {name(flag) for flag in xla_flags.split()}
  added = [flag for flag in flags if name(flag) not in given]
  return " ".join([xla_flags.strip(), *added]).strip()


def apply() -> None:
  os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""))
