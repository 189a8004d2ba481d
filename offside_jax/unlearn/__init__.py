"""offside_jax.unlearn"""
