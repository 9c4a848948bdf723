"""Pure tensor functions (no nn.Module, no config): the neural-memory update and attention helpers."""

from .neural_memory import debug_checks, memory_apply, memory_update, memory_update_reference, set_debug

__all__ = ["memory_update", "memory_update_reference", "memory_apply", "debug_checks", "set_debug"]
