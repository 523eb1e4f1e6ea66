"""Top-1 evaluation of a torch model on a dataset split."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from vitrim.pipeline.core.data import make_loader


@torch.no_grad()
def predict_logits(model: nn.Module, ds: Dataset, batch_size: int = 512, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a whole split, in order."""
    model.eval()
    outs, labels = [], []
    for x, y in make_loader(ds, batch_size):
        outs.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def top1(model: nn.Module, ds: Dataset, batch_size: int = 512, device: str = "cpu") -> float:
    """Top-1 accuracy in percent."""
    logits, labels = predict_logits(model, ds, batch_size, device)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()
