"""Capture residual-stream states by address with forward hooks, removed on exit.

``resid.00`` is the input of block 1 (a pre-hook, so it is exactly what the block reads: for Gemma the
embedding already scaled by sqrt(d)); ``resid.{l}`` the output of block ``l``; ``ln_final`` the output of
the final norm. This is how the raw last-block state is obtained without applying the final norm twice
(HF's ``hidden_states[L]`` is post-norm, METHODS §0.2).
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from latent_atlas.addresses import LN_FINAL, resid_address
from latent_atlas.models import ModelParts

Sink = Callable[[str, torch.Tensor], None]


def _tensor_of(output: Any) -> torch.Tensor:
    """Return the hidden-state tensor of a block's output (a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture_residuals(parts: ModelParts, layers: Sequence[int], sink: Sink, final_norm: bool = True) -> Iterator[None]:
    """Call ``sink(address, states)`` during each forward pass for the selected residual layers.

    Args:
        parts: the located modules of the model.
        layers: residual layers to capture (0 = embedding output .. L = last block output).
        sink: receives ``(address, tensor of shape (B, T, d))``; it must not keep the tensor alive
            longer than needed if memory matters.
        final_norm: also capture ``ln_final``.
    """
    handles: list[RemovableHandle] = []
    n_layers = len(parts.layers)
    for layer in layers:
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer {layer} outside 0..{n_layers}")
    try:
        if 0 in layers:
            handles.append(parts.layers[0].register_forward_pre_hook(_pre_hook(sink), with_kwargs=True))
        for layer in layers:
            if layer > 0:
                handles.append(parts.layers[layer - 1].register_forward_hook(_post_hook(resid_address(layer), sink)))
        if final_norm:
            handles.append(parts.final_norm.register_forward_hook(_post_hook(LN_FINAL, sink)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(sink: Sink) -> Callable[..., None]:
    """A pre-hook on block 1 that passes its input on as ``resid.00``."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        states = args[0] if args else kwargs["hidden_states"]
        sink(resid_address(0), states)

    return hook


def _post_hook(address: str, sink: Sink) -> Callable[..., None]:
    """A forward hook that passes a module's output on under ``address``."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        sink(address, _tensor_of(output))

    return hook


Edit = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def edit_residual(parts: ModelParts, layer: int, edit: Edit) -> Iterator[None]:
    """Replace ``resid.{layer}`` by ``edit(states)`` (shape ``(B, T, d)``) in every forward pass.

    ``resid.00`` is edited on its way into block 1 (a pre-hook), ``resid.{l}`` on its way out of block ``l``,
    so every later block reads the edited state, exactly where :func:`capture_residuals` reads it.
    """
    if not 0 <= layer <= len(parts.layers):
        raise ValueError(f"layer {layer} outside 0..{len(parts.layers)}")
    if layer == 0:

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple:
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

        handle = parts.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if isinstance(output, tuple):
                return (edit(output[0]), *output[1:])
            return edit(output)

        handle = parts.layers[layer - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
