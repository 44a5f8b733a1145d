"""What every fake kernel checks first: all tensor arguments on one device.

A meta tensor among real ones sends the whole call to the fake (Meta) kernel, since the
dispatcher picks the highest-priority backend of all the arguments; the fake kernel must then
refuse what the real one refuses, or it hands back an uninitialized tensor as a result. The error
is the host entry's (csrc/checks.cpp): ValueError naming the op and the argument.
"""

from typing import Optional

import torch


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]):
    """Raise ValueError unless every tensor in ``others`` (None skipped) is on ``ref``'s device."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"pyformer.{op}: argument '{name}': expected a tensor on {ref.device} (the device "
                f"of '{ref_name}'), got {t.device}"
            )
