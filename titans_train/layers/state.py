"""Streaming state containers: typed dataclasses with `detach()`, `to()` and `state_dict()`.

`StateMixin` gives a dataclass of tensors (or of other states with those methods, lists of them, ints, None)
the three methods, so each model's state is a plain typed record and nothing walks a loose dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor


def _map(value: Any, fn: Callable[[Tensor], Tensor], method: str, args=(), kwargs=None) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map(v, fn, method, args, kwargs) for v in value]
    if isinstance(value, tuple):
        return tuple(_map(v, fn, method, args, kwargs) for v in value)
    if hasattr(value, method):  # another state type (e.g. MemoryState) knows how to do it itself
        return getattr(value, method)(*args, **(kwargs or {}))
    return value


def _flatten(value: Any, prefix: str, out: dict) -> None:
    if isinstance(value, Tensor) or not (
        isinstance(value, (list, tuple)) or hasattr(value, "state_dict")
    ):
        out[prefix] = value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        for k, v in value.state_dict().items():
            out[f"{prefix}.{k}"] = v


class StateMixin:
    """detach(), to() and state_dict() for a dataclass whose fields are tensors, states, lists of them or ints."""

    def _replace(self, fn, method, *args, **kwargs):
        changes = {f.name: _map(getattr(self, f.name), fn, method, args, kwargs) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **changes)

    def detach(self):
        """The same state cut from the autograd graph (truncated backprop boundary)."""
        return self._replace(lambda t: t.detach(), "detach")

    def to(self, *args, **kwargs):
        """The state with every tensor moved/cast like `Tensor.to(*args, **kwargs)`."""
        return self._replace(lambda t: t.to(*args, **kwargs), "to", *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """A flat dict of dotted names to tensors and ints (for checkpoints and inspection)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            _flatten(getattr(self, f.name), f.name, out)
        return out


@dataclass
class KVCache(StateMixin):
    """Keys (after RoPE) and values of the most recent tokens of one attention layer, (B, H, n, head_dim).

    Sliding-window attention keeps the last `window - 1` tokens (all a future token can still see); full
    attention keeps every token, so for Transformer++ without a window it grows with the context.
    """

    k: Tensor
    v: Tensor

    def __len__(self) -> int:
        return self.k.shape[2]
