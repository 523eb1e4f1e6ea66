"""Top-1 evaluation of a torch model on a dataset split."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from vitrim.pipeline.core.data import make_loader


@torch.no_grad()
def top1(model: nn.Module, ds: Dataset, batch_size: int = 512, device: str | None = None, workers: int = 0) -> float:
    """Top-1 accuracy in percent, streamed (the split is never held in memory).

    ``device`` defaults to where the model's parameters are.
    """
    model.eval()
    device = device or str(next(model.parameters()).device)
    correct = total = 0
    for x, y in make_loader(ds, batch_size, workers=workers, pin_memory=device.startswith("cuda")):
        pred = model(x.to(device, non_blocking=True)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return 100.0 * correct / max(1, total)
