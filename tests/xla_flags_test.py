"""jaxloc's XLA:CPU flags: added to XLA_FLAGS on import, a user's own value winning."""

import os

from jaxloc import xla_flags


def test_the_flags_are_added_beside_the_users_own():
  assert xla_flags.with_cpu_flags("") == "--xla_cpu_prefer_vector_width=512"
  got = xla_flags.with_cpu_flags(" --xla_force_host_platform_device_count=2 ")
  assert got == "--xla_force_host_platform_device_count=2 --xla_cpu_prefer_vector_width=512"


def test_a_flag_the_user_set_wins():
  mine = "--xla_cpu_prefer_vector_width=256 --xla_dump_to=/tmp/x"
  assert xla_flags.with_cpu_flags(mine) == mine
  assert xla_flags.with_cpu_flags(xla_flags.with_cpu_flags("")) == xla_flags.with_cpu_flags("")


def test_importing_jaxloc_set_them_in_this_process():
  names = [flag.split("=", 1)[0] for flag in os.environ["XLA_FLAGS"].split()]
  assert "--xla_cpu_prefer_vector_width" in names
