"""A stand-in model for loss tests whose logits are a fixed table lookup.

``logits[b, t] = table[input_ids[b, t]]``: position-free, but enough to pin every loss formula
down with hand computations. It implements the part of the model interface losses use:
``hidden_states(batch, collect_hidden)``, ``logits(hidden)``, ``output_head()`` (none: the
losses then take the logits path) and ``dtype``; the "residual stream after layer i" is
``(i + 1) * table[input_ids]``.
"""
from __future__ import annotations

import jax.numpy as jnp


class TableModel:
    dtype = jnp.float32
    vision = False
    image_inputs = ()

    def __init__(self, table, layers: int = 3):
        self.table = jnp.asarray(table)
        self.layers = layers

    def hidden_states(self, batch, collect_hidden: bool = False):
        hidden = jnp.take(self.table, batch["input_ids"], axis=0)
        return (hidden, [hidden * (i + 1) for i in range(self.layers)]) if collect_hidden else hidden

    def logits(self, hidden):
        return hidden

    def output_head(self):
        return None
