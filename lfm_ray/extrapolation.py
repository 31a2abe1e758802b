"""Category extrapolation in the trainer: auxiliary classes train beside the target classes.

"Learning from Neighbors: Category Extrapolation for Long-Tail Learning" (Zhao et al., CVPR
2025; code Shizhen-ZHAO/Gran_LT). With `aux.root` set, one worker's run (lfm_ray.worker.loop.Run)
changes in these places, all through `AuxTraining`:

- classes: C_t target classes, then C_a auxiliary ones. The head has C_t + C_a rows (the
  text features of every name, the auxiliary names included); the loss and the mixer see
  all of them, with their counts, so LFM may pair a tail class with its auxiliary neighbours.
- images: each epoch trains on every target image and a fresh subset of each auxiliary
  class, min(n_a, aux.max_per_class) images drawn without replacement from a generator
  seeded by (seed, epoch), so a resumed run draws what an uninterrupted one would. Positions
  N_t.. of the epoch hold the subsets class by class, so each position's label, and each
  class's count, is the same every epoch: only which image fills a position changes.
- loss: with aux.silence other than none, neighbour silencing (lfm_ray.losses) on the
  sample's unmixed label; else the configured loss over all C_t + C_a classes.
- inference: the auxiliary rows are dropped before the argmax; metrics, per-class accuracy,
  the shot groups and the confusion matrix are those of the target classes alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from lfm_ray.data.auxiliary import AuxArrays, load_aux_arrays
from lfm_ray.data.preprocess import resize_square
from lfm_ray.transfer import to_device

# Mixed into the epoch generator's seed, so the auxiliary draw is its own stream and never
# the shuffle's or the mixer's.
AUX_STREAM = 11


def aux_record(aux: "AuxTraining | None") -> dict[str, int]:
    """What metrics.json records of the auxiliary classes: how many trained, and how many of
    their images one epoch uses (0 and 0 without them)."""
    if aux is None:
        return {"aux_classes": 0, "aux_images": 0}
    return {"aux_classes": aux.num_aux, "aux_images": aux.images_per_epoch}


class EpochImages:
    """One epoch's training images: the target images (positions 0..N_t − 1), then each
    auxiliary class's subset (positions N_t.., class by class). Indexable like
    `lfm_ray.augment.DeviceImages`; `select(order)` sets which auxiliary image fills each
    auxiliary position."""

    def __init__(self, target, target_size: int, aux, aux_size: int, aux_slots: int,
                 size: int, interpolation: str, device: torch.device):
        self.target, self.aux = target, aux
        self.num_target, self.slots = len(target), int(aux_slots)
        self.target_size, self.aux_size = int(target_size), int(aux_size)
        self.size, self.interpolation = int(size), interpolation
        self.device = torch.device(device)
        self.chosen = torch.zeros(self.slots, dtype=torch.long)  # aux image of each slot

    def __len__(self) -> int:
        return self.num_target + self.slots

    def select(self, chosen: torch.Tensor) -> None:
        if chosen.shape != (self.slots,):
            raise ValueError(f"expected {self.slots} auxiliary images, got {tuple(chosen.shape)}")
        self.chosen = chosen.long().cpu()

    def _at_size(self, x: torch.Tensor, stored: int) -> torch.Tensor:
        """A part stored at another size than the other part is brought to the model's size,
        so both parts stack into one batch (a target set kept at its native size, say, beside
        auxiliary images cached at the model's). It is the batch builder's own resize, and a
        horizontal flip commutes with it, so the batch comes out as the builder would make it."""
        if stored == self.size or self.target_size == self.aux_size:
            return x
        out = resize_square(x.permute(0, 3, 1, 2).float(), self.size, self.interpolation)
        return out.to(torch.uint8).permute(0, 2, 3, 1)

    def gather(self, positions: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the device, in the order of `positions`."""
        positions = positions.cpu().long()
        is_aux = positions >= self.num_target
        if not bool(is_aux.any()):
            return self._at_size(self.target.gather(positions), self.target_size)
        aux_pos = self.chosen[positions[is_aux] - self.num_target]
        if bool(is_aux.all()):
            return self._at_size(self.aux.gather(aux_pos), self.aux_size)
        xt = self._at_size(self.target.gather(positions[~is_aux]), self.target_size)
        xa = self._at_size(self.aux.gather(aux_pos), self.aux_size)
        out = torch.empty((len(positions), *xt.shape[1:]), dtype=torch.uint8, device=xt.device)
        out[to_device((~is_aux).nonzero().squeeze(1), xt.device)] = xt
        out[to_device(is_aux.nonzero().squeeze(1), xt.device)] = xa
        return out


class AuxTraining:
    """The auxiliary classes of one worker's run: names, per-epoch counts, the joined training
    set, the silenced sets and the loss."""

    def __init__(self, cfg, arrays: AuxArrays, num_target: int):
        self.cfg = cfg
        self.arrays = arrays
        self.num_target = int(num_target)
        self.num_aux = arrays.num_classes
        labels = np.asarray(arrays.labels, dtype=np.int64)
        # Per auxiliary class, its images (positions in the cached array), in a fixed order.
        self.members = [np.flatnonzero(labels == a) for a in range(self.num_aux)]
        cap = int(cfg.aux.max_per_class)
        # Images per epoch of each auxiliary class: the same every epoch.
        self.counts = [min(len(m), cap) for m in self.members]
        self.images_per_epoch = int(sum(self.counts))
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.images: EpochImages | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.arrays.class_names)

    def silenced(self) -> torch.Tensor:
        from lfm_ray.losses import silenced_sets

        neighbours = self.arrays.neighbours or [[] for _ in range(self.num_target)]
        mode = self.cfg.aux.silence if self.arrays.neighbours is not None else "none"
        return silenced_sets(neighbours, self.num_aux, mode)

    def loss_fn(self, class_counts: Sequence[int], text_features: torch.Tensor,
                logit_scale: float) -> torch.nn.Module:
        """Neighbour silencing on the configured loss (ce or balce), or with aux.silence none
        the configured loss itself, over all C_t + C_a classes."""
        from lfm_ray.losses import build_loss, build_silencing_loss

        cfg = self.cfg
        if cfg.aux.silence == "none":
            return build_loss(cfg.loss.name, class_counts, text_features=text_features,
                              **cfg.loss.params(logit_scale))
        return build_silencing_loss(cfg.loss.name, class_counts, self.silenced(),
                                    cfg.loss.balce_tau).to(text_features.device)

    def join(self, target_images, target_labels: torch.Tensor, target_size: int, spec,
             device: torch.device) -> tuple[EpochImages, torch.Tensor]:
        """(the epoch's training images, their labels): targets first, then the auxiliary
        positions class by class, labelled C_t + a."""
        from lfm_ray.augment import DeviceImages

        aux_images = DeviceImages(self.arrays.images, device)
        self.images = EpochImages(target_images, target_size, aux_images,
                                  int(self.arrays.images.shape[1]), self.images_per_epoch,
                                  spec.size, spec.interpolation, device)
        aux_labels = np.repeat(np.arange(self.num_aux, dtype=np.int64) + self.num_target,
                               self.counts)
        labels = torch.cat([target_labels.long(), torch.as_tensor(aux_labels)])
        self.start_epoch(0)
        return self.images, labels

    def epoch_choice(self, epoch: int) -> torch.Tensor:
        """Which cached auxiliary image fills each auxiliary position in `epoch`: per class a
        uniform subset of min(n_a, cap) of its images, without replacement, from a generator
        seeded by (seed, epoch)."""
        from lfm_ray.worker.distributed import seeded_generator

        gen = seeded_generator(self.cfg.runtime.seed, epoch, AUX_STREAM)
        picks = []
        for members, count in zip(self.members, self.counts):
            order = torch.randperm(len(members), generator=gen)[:count]
            picks.append(torch.as_tensor(members)[order])
        return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)

    def start_epoch(self, epoch: int) -> None:
        """Draw epoch `epoch`'s auxiliary subsets (before its first batch)."""
        if self.images is not None:
            self.images.select(self.epoch_choice(epoch))


def auxiliary_training(cfg, target_names: Sequence[str], spec,
                       cache_dir: Any = None) -> AuxTraining | None:
    """The run's auxiliary classes (cached on this node), or None without `aux.root`."""
    if cfg.aux.root is None:
        return None
    arrays = load_aux_arrays(cfg, target_names, spec, cache_dir)
    return AuxTraining(cfg, arrays, len(target_names))
