"""offside_jax.train"""
