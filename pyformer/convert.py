"""``pyformer.convert(model)``: run an existing PyTorch model's norms and attention on pyformer.

Every ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm`` and ``torch.nn.MultiheadAttention`` inside the
model becomes its pyformer twin (:class:`pyformer.nn.LayerNorm`, :class:`pyformer.nn.RMSNorm`,
:class:`pyformer.nn.MultiheadAttention`). The twins
subclass the PyTorch modules and add no state, so conversion changes the class of each module
object in place: the parameters stay the very same tensors (same values, dtype, device, and any
optimizer state, hooks or tied weights keep pointing at them), and ``state_dict`` keys do not move.

PyTorch's Transformer layers have "fast paths" that, in eval mode without autograd, skip the
attention and norm modules and call one fused native op on their parameters. Conversion turns
those paths off on the layers it touches (``TransformerEncoder.use_nested_tensor = False``;
``TransformerEncoderLayer.activation_relu_or_gelu = 0``, an attribute only the fast path reads)
so that the converted modules really run, in train and eval mode alike.
"""

from __future__ import annotations

from typing import List, NamedTuple, Type

import torch

__all__ = ["convert", "Replacement"]


class Replacement(NamedTuple):
    """One converted module: its qualified name in the model and its class before and after."""

    name: str
    old: Type[torch.nn.Module]
    new: Type[torch.nn.Module]


def convert(
    model: torch.nn.Module,
    *,
    layer_norm: bool = True,
    attention: bool = True,
    rms_norm: bool = True,
    backend: str = "pyformer",
) -> List[Replacement]:
    r"""Replace ``torch.nn.LayerNorm`` / ``RMSNorm`` / ``MultiheadAttention`` inside ``model`` in place.

    Only modules whose type is exactly the PyTorch class are converted (a user subclass with its
    own ``forward`` is left alone); ``model`` itself is converted too if it is one.

    Args:
        model (torch.nn.Module): the model, changed in place.
        layer_norm (bool): convert ``torch.nn.LayerNorm``. Default: ``True``
        attention (bool): convert ``torch.nn.MultiheadAttention``. Default: ``True``
        rms_norm (bool): convert ``torch.nn.RMSNorm``. Default: ``True``
        backend (str): ``"pyformer"`` (the kernels) or ``"reference"`` (pure PyTorch).

    Returns:
        list of :class:`Replacement` ``(name, old, new)``, one per converted module, in
        ``named_modules`` order (the root's name is ``""``).

    Example::

        >>> model = torch.nn.Transformer(d_model=256, nhead=8, batch_first=True)
        >>> replaced = pyformer.convert(model)
        >>> len(replaced)   # 6 + 6 layers: 18 attentions, 32 norms (incl. the two final norms)
        50
        >>> out = model(src, tgt, src_key_padding_mask=pad)  # same result, pyformer kernels
    """
    from .nn import LayerNorm, MultiheadAttention, RMSNorm
    from .nn._backend import check_backend

    check_backend(backend)
    table = {}
    if layer_norm:
        table[torch.nn.LayerNorm] = LayerNorm
    if attention:
        table[torch.nn.MultiheadAttention] = MultiheadAttention
    if rms_norm:
        table[torch.nn.RMSNorm] = RMSNorm

    replaced: List[Replacement] = []
    for name, module in model.named_modules():
        new_cls = table.get(type(module))
        if new_cls is not None:
            old_cls = type(module)
            module.__class__ = new_cls
            module.backend = backend
            replaced.append(Replacement(name, old_cls, new_cls))

    if replaced:
        for module in model.modules():
            if isinstance(module, torch.nn.TransformerEncoder):
                module.use_nested_tensor = False
            elif isinstance(module, torch.nn.TransformerEncoderLayer):
                module.activation_relu_or_gelu = 0
    return replaced
