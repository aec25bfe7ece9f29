"""Does a reference model draw the class it is asked for? A small CNN learns to name the procedural pictures
of the model's data set (tools/procedural.py), then names the model's samples.

    probe = train_probe("scenes", steps=400, device="cuda")
    accuracy(probe, images, labels)

The probe sees pictures average-pooled to at most PROBE_SIZE pixels a side and learns from pictures drawn at
that size on the CPU (cheap even for the 256 px scenes). Its accuracy on fresh pictures drawn at the model's
own size is the ceiling a model's samples can reach; 1 / classes is chance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tools import procedural

PROBE_SIZE = 64


class Probe(nn.Module):
    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        chans = (3, width, 2 * width, 4 * width, 4 * width)
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], classes)

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, classes) for images (B, 3, H, W) in [-1, 1]."""
        if images.shape[-1] > PROBE_SIZE:
            images = F.adaptive_avg_pool2d(images, PROBE_SIZE)
        return self.head(self.features(images).mean(dim=(2, 3)))


def train_probe(data: str, size: int = PROBE_SIZE, steps: int = 400, batch: int = 64, seed: int = 0,
                device="cpu") -> Probe:
    """A probe trained on `steps` fresh batches of data set `data`, drawn at min(size, PROBE_SIZE) pixels."""
    ds = procedural.dataset(data)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = Probe(len(ds.names)).to(device).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        images, labels = ds.sample(batch, gen, size=min(size, PROBE_SIZE))
        loss = F.cross_entropy(probe(images.to(device)), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return probe.eval()


@torch.no_grad()
def predictions(probe: Probe, images: Tensor, batch: int = 256) -> Tensor:
    device = next(probe.parameters()).device
    return torch.cat([probe(chunk.to(device).float()).argmax(dim=1).cpu() for chunk in images.split(batch)])


def accuracy(probe: Probe, images: Tensor, labels) -> float:
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    return (predictions(probe, images) == labels).float().mean().item()


def real_accuracy(probe: Probe, data: str, size: int, per_class: int = 20, seed: int = 54321) -> float:
    """Accuracy on fresh pictures drawn at the model's own size: the ceiling for its samples."""
    ds = procedural.dataset(data)
    labels = torch.arange(len(ds.names)).repeat_interleave(per_class)
    images, _ = ds.sample(labels.numel(), torch.Generator().manual_seed(seed), size=size, labels=labels)
    return accuracy(probe, images, labels)
