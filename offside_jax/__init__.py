"""offside_jax: correcting what (vision-)language models have learned, in JAX/Flax."""

__version__ = "0.1.0"
