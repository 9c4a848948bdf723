"""Pure tensor functions (no nn.Module, no config): the neural-memory update and attention helpers."""

from .neural_memory import debug_checks, memory_update, memory_update_reference, set_debug

__all__ = ["memory_update", "memory_update_reference", "debug_checks", "set_debug"]
