"""Which training images an epoch draws (`stage1.sampler`, `stage2.sampler`).

- instance-balanced: every training image once, in a random order (a shuffle); class k
  makes up n_k / N of the epoch. The default, and what LFM's first sample is (paper Eq. 1).
- class-balanced: each draw picks a class uniformly among those with training images, then
  one of its images uniformly (class-aware sampling, Shen et al. 2016; the second phase of
  Kang et al.'s cRT, 2020); class k makes up 1/C of the epoch.
- square-root: class k with probability √n_k / Σ_j √n_j, then one of its images uniformly
  (Mahajan et al. 2018; Kang et al.'s class-balancing q = 1/2).

The last two draw independently with replacement. Every sampler gives an epoch of N
positions (N the training set's size, so the number of steps does not depend on the sampler)
from a generator seeded by (seed, epoch) that every rank shares; each rank takes its own
slice, as of the shuffle, and a resumed run draws what an uninterrupted one would.

How the samplers meet the mixing methods: with Mixup, Remix and CutMix the partners are a
permutation of the sampled batch, so they follow the sampler too; ConCutMix's pasted image
keeps its own class-balanced draw. LFM defines its first sample as a uniform draw over the
training images and rebalances through its partner law and label shift, so a stage with
another sampler refuses LFM (RunConfig.validate).
"""

from __future__ import annotations

from typing import Any

import torch

from lfm_ray.config import SAMPLERS
from lfm_ray.errors import LfmError

# The exponent p of a sampler's class law q_k ∝ n_k^p (instance-balanced is p = 1, drawn as
# a shuffle rather than with replacement).
CLASS_EXPONENT = {"instance-balanced": 1.0, "class-balanced": 0.0, "square-root": 0.5}
assert tuple(CLASS_EXPONENT) == SAMPLERS  # config.py lists the names for --help


def class_probabilities(counts: Any, exponent: float) -> torch.Tensor:
    """q_k = n_k^p / Σ_j n_j^p over the classes with training images (0 for the others),
    float64."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    if not bool((n > 0).any()):
        raise LfmError("the sampler needs training images")
    q = torch.where(n > 0, n.pow(float(exponent)), torch.zeros_like(n))
    return q / q.sum()


class EpochSampler:
    """One stage's draw of an epoch's training positions."""

    def __init__(self, name: str, train_labels: Any, num_classes: int):
        from lfm_ray.mixing import ClassImages

        if name not in CLASS_EXPONENT:
            raise LfmError(f"sampler {name!r} is not valid; expected one of {', '.join(SAMPLERS)}")
        self.name = name
        self.images = ClassImages(train_labels, num_classes)
        self.size = int(self.images.order.numel())
        self.class_law = class_probabilities(self.images.counts, CLASS_EXPONENT[name])

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """N training positions for one epoch, (N,) long on the CPU."""
        if self.name == "instance-balanced":
            return torch.randperm(self.size, generator=generator)
        classes = torch.multinomial(self.class_law, self.size, replacement=True,
                                    generator=generator)
        return self.images.sample(classes, generator)
