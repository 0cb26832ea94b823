"""The benchmarks' own tests: the tiny model and the settings the service's tests use."""

from tests.conftest import one_torch_thread, tiny_loaded, tiny_model_dir

__all__ = ["one_torch_thread", "tiny_loaded", "tiny_model_dir"]
