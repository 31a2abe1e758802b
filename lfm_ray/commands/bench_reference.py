"""The reference-style pipeline the benchmark compares against.

It behaves like the authors' published pipeline: a `torch.utils.data.DataLoader` over PIL
images with per-image bicubic resize, flip, ToTensor and Normalize; LFM partners drawn by a
Python loop per sample (`random.choices` over a row of P); mixing inside the collate
function; fp32; CE loss. It exists only to be measured against; the trainer never uses it.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def python_partner_sampler(P: np.ndarray, labels_by_class: Sequence[Sequence[int]],
                           batch_labels: Sequence[int], rng: random.Random) -> list[int]:
    """One partner image per sample: class by `random.choices` over P's row, then an image."""
    classes = range(P.shape[0])
    out = []
    for y in batch_labels:
        j = rng.choices(classes, weights=P[y])[0]
        out.append(rng.choice(labels_by_class[j]))
    return out


class PILDataset(torch.utils.data.Dataset):
    """uint8 arrays served as PIL images through torchvision transforms, one image at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int,
                 mean: Sequence[float], std: Sequence[float]):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(np.asarray(self.images[i]))), int(self.labels[i])


class LFMCollate:
    """Mixing in the collate function: partners by the Python sampler, one λ per batch."""

    def __init__(self, dataset: PILDataset, P: np.ndarray, class_counts: Sequence[int],
                 alpha: float, beta: float, seed: int = 0):
        self.dataset, self.P = dataset, P
        self.counts = np.asarray(class_counts, dtype=np.float64)
        self.alpha, self.beta = alpha, beta
        self.rng = random.Random(seed)
        self.by_class: list[list[int]] = [[] for _ in range(P.shape[0])]
        for i, y in enumerate(dataset.labels):
            self.by_class[int(y)].append(i)

    def __call__(self, batch):
        x_i = torch.stack([b[0] for b in batch])
        y_i = [b[1] for b in batch]
        partners = python_partner_sampler(self.P, self.by_class, y_i, self.rng)
        pairs = [self.dataset[j] for j in partners]
        x_j = torch.stack([p[0] for p in pairs])
        y_j = [p[1] for p in pairs]
        lam = float(np.random.beta(self.beta, self.beta))
        x = lam * x_i + (1 - lam) * x_j
        n_i, n_j = self.counts[y_i], self.counts[y_j]
        lam_y = np.clip(lam - self.alpha * (n_i - n_j) / (n_i + n_j), 0.0, 1.0)
        C = self.P.shape[0]
        t = torch.zeros(len(batch), C)
        t[torch.arange(len(batch)), torch.tensor(y_i)] += torch.tensor(lam_y, dtype=torch.float32)
        t[torch.arange(len(batch)), torch.tensor(y_j)] += torch.tensor(1 - lam_y, dtype=torch.float32)
        return x, t


def reference_loader(images: np.ndarray, labels: np.ndarray, spec, P: np.ndarray,
                     class_counts: Sequence[int], batch_size: int, num_workers: int,
                     alpha: float = 1.0, beta: float = 0.2) -> torch.utils.data.DataLoader:
    dataset = PILDataset(images, labels, spec.size, spec.mean, spec.std)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
        collate_fn=LFMCollate(dataset, P, class_counts, alpha, beta),
        persistent_workers=num_workers > 0,
    )


def reference_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                   targets: torch.Tensor, device: torch.device) -> torch.Tensor:
    """fp32 forward, soft-target CE, backward, step: what the reference does per batch."""
    x, targets = x.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    logits = model(x)
    loss = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()
