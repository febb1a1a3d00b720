import gc

import jax
import pytest

# Solver tests compare against float64 references; float32 paths request float32 explicitly.
jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. The suite compiles thousands of
    shapes in one process; each CPU executable keeps memory mappings, and a full run was seen to
    crash inside XLA compilation (SIGSEGV/SIGABRT, always at the same test, never when run in
    parts) as they accumulated toward the kernel's per-process map limit (vm.max_map_count)."""
    yield
    jax.clear_caches()
    gc.collect()
