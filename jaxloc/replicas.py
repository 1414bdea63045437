"""The members of a replica run (`config.replicas` = N > 1): member i is the run of
`member_config(config, i)`: seed `config.seed + i` and, where `config.vary` lists values,
its own value of each listed hyperparameter (`tasks.hyperparameters`: numbers that enter the
compiled train step as arguments, so the members still share one program). `resolve_mode`
says how they share it."""

import jax
import ml_collections

from jaxloc import tasks
from jaxloc.errors import UserError

# How members share one program when config.replica_mode = "auto" (see
# `train_state.compile_train_steps`): measured with `python -m experiments.benchmark
# --parts=replicas` (docs/speed.md). Accelerators: unmeasured; vmap batches the members'
# matrix products into one, the kind of work an accelerator wants.
DEFAULT_MODE = {"cpu": "vmap"}
MODES = ("vmap", "map")
EXAMPLE = '--config.vary="learning_rate=1e-3,3e-3 ema_decay=0.99,0.999"'


def resolve_mode(mode: str) -> str:
  if mode != "auto":
    return mode
  return DEFAULT_MODE.get(jax.default_backend(), "vmap")


def varied(config: ml_collections.ConfigDict) -> dict[str, tuple[float, ...]]:
  """`config.vary` read: "learning_rate=1e-3,3e-3 ema_decay=0.99,0.999" (entries apart by
  spaces or `;`) -> {field: one value per member}. UserError, with the fix, for what cannot
  be run."""
  text, allowed = config.get("vary") or "", tasks.hyperparameters(config)
  out = {}
  for entry in text.replace(";", " ").split():
    name, _, values = entry.partition("=")
    if name not in allowed:
      raise UserError(
        f"config.vary={text!r}: {entry!r} is not <field>=<value>,<value>,... of a field this "
        f"config's members may vary ({', '.join(allowed)}); e.g. {EXAMPLE}"
      )
    if name in out:
      raise UserError(f"config.vary={text!r} lists {name} twice")
    try:
      out[name] = tuple(float(v) for v in values.split(","))
    except ValueError:
      raise UserError(f"config.vary={text!r}: the values of {name} must be numbers") from None
    if len(out[name]) != config.replicas:
      raise UserError(
        f"config.vary lists {len(out[name])} values of {name} for config.replicas="
        f"{config.replicas}: one value per member (--config.replicas={len(out[name])})"
      )
  return out


def member_config(config: ml_collections.ConfigDict, i: int) -> ml_collections.ConfigDict:
  """The config of member `i`, a run of its own: seed `config.seed + i`, its listed values."""
  member = ml_collections.ConfigDict(config.to_dict())
  for field, values in varied(config).items():
    *groups, name = field.split(".")
    group = member
    for g in groups:
      group = group[g]
    group[name] = values[i]
  member.seed, member.replicas, member.vary = config.seed + i, 1, ""
  return member


def check(config: ml_collections.ConfigDict) -> None:
  """Rejects replica settings that cannot work (after `tasks.check_config`): the mode, the
  listed values, each member's config."""
  if config.replica_mode not in ("auto", *MODES):
    raise UserError(f"config.replica_mode={config.replica_mode!r}: use 'auto', 'vmap' or 'map'")
  if not varied(config):
    return
  members = [member_config(config, i) for i in range(config.replicas)]
  for i, member in enumerate(members):
    try:
      tasks.check_config(member)
    except UserError as e:
      raise UserError(f"config.vary: member {i}: {e}") from None
  if len({m.ema_decay > 0 for m in members}) > 1:
    raise UserError(
      "config.vary: ema_decay mixes 0 (no moving average) with averages; the members share "
      "one train state layout, so list only values > 0, or only 0"
    )
