import jax

# Solver tests compare against float64 references; float32 paths request float32 explicitly.
jax.config.update("jax_enable_x64", True)
