"""HookPoint: an identity module users place in their own model code to mark a capture point."""
from __future__ import annotations

import torch


class HookPoint(torch.nn.Module):
    """Identity on the forward pass. With a name, the spec selects it by that name; without
    one, by its module path. The tensor must be [batch, tokens, ...] like the residual stream.

        self.hook_feature = dmi.HookPoint("my_feature")
        ...
        x = self.hook_feature(x)
    """

    def __init__(self, name: str | None = None):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return repr(self.name) if self.name else ""
