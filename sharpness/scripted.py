"""TorchScript archives as ordinary modules: ``torch.func.functional_call`` refuses scripted modules
("The stateless API can't be used with Jitted modules"), so :class:`ScriptedModel` owns the tensors and
passes them into the scripted code at each call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ScriptedModel(nn.Module):
    """An ``nn.Module`` holding a TorchScript module's parameters and buffers under the same names.

    ``forward`` hands them (or whatever ``functional_call`` substituted for them) to the scripted code, then
    restores the scripted module's own tensors, so HVPs through the functional core see the scripted function.
    Costs as the scripted forward, plus one attribute swap per tensor.
    """

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        object.__setattr__(self, "scripted", scripted)  # not a registered child: its tensors are ours
        self._names: list[str] = []
        for kind, items in (("p", scripted.named_parameters()), ("b", scripted.named_buffers())):
            for name, t in items:
                *path, leaf = name.split(".")
                owner: nn.Module = self
                for part in path:
                    if not hasattr(owner, part):
                        owner.add_module(part, nn.Module())
                    owner = getattr(owner, part)
                if kind == "p":
                    owner.register_parameter(leaf, nn.Parameter(t.detach().clone(), t.requires_grad))
                else:
                    owner.register_buffer(leaf, t.detach().clone())
                self._names.append(name)

    def _slots(self, name: str) -> tuple[Any, str]:
        *path, leaf = name.split(".")
        mod: Any = self.scripted
        for part in path:
            mod = getattr(mod, part)
        return mod._c, leaf

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.scripted.train(self.training)
        saved = []
        try:
            for name in self._names:
                slot, leaf = self._slots(name)
                saved.append((slot, leaf, slot.getattr(leaf)))
                owner = self.get_submodule(name.rpartition(".")[0]) if "." in name else self
                slot.setattr(leaf, getattr(owner, name.rpartition(".")[2]))
            return self.scripted(*args, **kwargs)
        finally:
            for slot, leaf, value in reversed(saved):
                slot.setattr(leaf, value)
