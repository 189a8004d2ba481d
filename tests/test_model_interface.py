"""The one model interface (offside_jax.models.interface): what losses, evaluation and
dampening may ask of a model, answered by each family without attribute probing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from transformers import LlamaConfig

from offside_jax.models.auto import create_model
from offside_jax.models.interface import CausalLM
from offside_jax.train import losses

SHAPE = dict(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, pad_token_id=0, eos_token_id=1)


def test_tied_head_is_the_embedding_transposed_and_matches_the_logits():
    model = create_model(LlamaConfig(**SHAPE, tie_word_embeddings=True), seed=0)
    assert isinstance(model, CausalLM) and model.vision is False and tuple(model.image_inputs) == ()
    head = model.output_head()
    np.testing.assert_array_equal(head, np.asarray(model.model.embed_tokens.embedding[...]).T)
    hidden = model.hidden_states({"input_ids": jnp.array([[2, 3, 4]])})
    np.testing.assert_allclose(np.asarray(hidden @ head), np.asarray(model.logits(hidden)), rtol=1e-5, atol=1e-6)


def test_untied_head_is_its_kernel_and_none_with_adapters():
    model = create_model(LlamaConfig(**SHAPE, tie_word_embeddings=False), seed=0)
    np.testing.assert_array_equal(model.output_head(), np.asarray(model.lm_head.kernel[...]))
    assert losses.output_head(model) is not None
    # (lora.apply never adapts lm_head; a head built otherwise must still say it is no plain matmul)
    model.lm_head.add_lora(2, 4.0, 0.0, jax.random.key(0))
    assert model.output_head() is None  # the fused cross-entropy then takes model.logits
