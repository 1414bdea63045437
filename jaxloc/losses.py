"""Per-head losses of the localiser and their weighted total.

Class: softmax cross-entropy on integer labels (the seed's categorical
cross-entropy on one-hot labels). Box: mean squared error over the 4 normalised
coordinates (Keras' `mse`: mean over coordinates, then over the batch).
"""

import jax
import jax.numpy as jnp
import optax


def class_loss(logits_BxC: jax.Array, label_B: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, label_B)


def box_loss(pred_Bx4: jax.Array, true_Bx4: jax.Array) -> jax.Array:
  """Per-example mean squared error over the 4 box numbers [B]."""
  return jnp.mean(jnp.square(pred_Bx4 - true_Bx4), axis=-1)


def total_loss(
  outputs: dict[str, jax.Array], batch, *, class_weight: float, box_weight: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted batch-mean loss and its parts."""
  cls = jnp.mean(class_loss(outputs["logits"], batch["label"]))
  box = jnp.mean(box_loss(outputs["box"], batch["box"]))
  loss = class_weight * cls + box_weight * box
  return loss, {"loss": loss, "class_loss": cls, "box_loss": box}
