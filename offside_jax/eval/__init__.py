"""offside_jax.eval"""
