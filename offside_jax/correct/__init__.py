"""offside_jax.correct"""
