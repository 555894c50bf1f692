"""The demo model: a small tanh MLP trained for a few seconds on the embedded digits.

``sharpness --demo`` calls :func:`train_demo`, which saves the model in the toolkit's self-describing
checkpoint format with ``arch="sharpness.demo:mlp"``, so the report needs no ``--arch``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import save_checkpoint
from .data import load_dataset

#: Where ``sharpness --demo`` saves its checkpoint unless told otherwise.
DEFAULT_DEMO_PATH = Path("runs/demo/model.pt")
ARCH = "sharpness.demo:mlp"


def mlp(in_features: int = 64, hidden: int = 32, depth: int = 2, num_classes: int = 10) -> nn.Sequential:
    """``Flatten -> (Linear -> Tanh) x depth -> Linear``: smooth everywhere, so its Hessian is well defined.

    With the defaults (8x8 digits, 32 hidden units, 2 hidden layers) it has 3,466 parameters.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def train_demo(
    path: str | Path = DEFAULT_DEMO_PATH,
    *,
    epochs: int = 60,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    hidden: int = 32,
    seed: int = 0,
) -> tuple[nn.Module, Path, dict[str, Any]]:
    """Train :func:`mlp` with SGD + momentum on the digits train split and save it atomically at ``path``.

    Deterministic for a given ``seed`` (initialisation and batch order). Cost: ``epochs`` passes over the
    train split, i.e. ``epochs * ceil(n_train / batch_size)`` gradients (about 2,700 with the defaults, a few
    seconds on one CPU core). Returns ``(model, path, info)``; ``info`` holds the training settings and the
    final train loss, and is recorded in the checkpoint.
    """
    train = load_dataset("digits", split="train", seed=seed)
    x, y = train.x.float(), train.y.long()
    in_features = int(x[0].numel())
    arch_kwargs = {"in_features": in_features, "hidden": hidden, "depth": 2, "num_classes": train.num_classes}
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = mlp(**arch_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    steps = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            steps += 1
    model.eval()
    with torch.no_grad():
        out = model(x)
        train_loss = float(loss_fn(out, y))
        train_acc = float((out.argmax(1) == y).float().mean())
    info = {
        "data": "digits",
        "split": "train",
        "n_train": int(x.shape[0]),
        "optimizer": "SGD",
        "lr": lr,
        "momentum": momentum,
        "batch_size": batch_size,
        "epochs": epochs,
        "steps": steps,
        "seed": seed,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    path = Path(path)
    save_checkpoint(path, model, arch=ARCH, arch_kwargs=arch_kwargs, extra={"training": info})
    return model, path, info
