"""Keyed streams over a dataset: every example once per pass, a fresh pseudo-random order
every pass, batch t a function of (key, t) alone, so a resumed run reads the same batches.
The order is a Feistel permutation computed per index on the device (no permutation array).
"""

import functools

import jax
import jax.numpy as jnp


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (Wellons' "lowbias32"): cheap, elementwise, well mixed."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


@functools.partial(jax.jit, static_argnames=("num",))
def permute_index(key: jax.Array, i: jax.Array, num: int) -> jax.Array:
  """Elements `i` (any shape) of a pseudo-random permutation of [0, num) chosen by `key`,
  without building the permutation: a 4-round Feistel network on the smallest even number
  of bits that holds `num`, round i hashing the right half with round key i (from `key`),
  walked until the result falls inside [0, num) ("cycle walking", a few rounds at most)."""
  half = max(1, (int(num - 1).bit_length() + 1) // 2)
  mask = jnp.uint32((1 << half) - 1)
  round_keys = jax.random.bits(key, (4,), jnp.uint32)

  def feistel(x):
    left, right = x >> half, x & mask
    for r in range(4):
      left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    return (left << half) | right

  outside = lambda x: jnp.any(x >= num)
  walk = lambda x: jnp.where(x >= num, feistel(x), x)
  return jax.lax.while_loop(outside, walk, feistel(jnp.asarray(i, jnp.uint32))).astype(jnp.int32)


def stream_index(key: jax.Array, step: jax.Array, batch_size: int, num: int) -> jax.Array:
  """Example indices int32 [batch_size] of batch `step` of a stream that reads all `num`
  examples in passes, pass p in the order `permute_index(fold_in(key, p), ., num)`, with
  batches running on across the end of a pass: the seed's tf.data
  `shuffle(buffer_size >= num).repeat().batch(batch_size)`. Every example is seen once
  per pass. (int32 positions: fine up to step * batch_size < 2**31.)"""
  position = step * batch_size + jnp.arange(batch_size)
  first_pass = step * batch_size // num
  passes = batch_size // num + 2  # how many passes one batch can touch
  orders = [
    permute_index(jax.random.fold_in(key, first_pass + p), position % num, num)
    for p in range(passes)
  ]
  return jnp.choose(position // num - first_pass, orders, mode="clip")
