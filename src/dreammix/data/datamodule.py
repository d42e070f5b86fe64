"""Lightning datamodule: the encoded source set and regular set, one batch of each per step.

Batches are a pure function of ``(seed, position in the stream)`` (:class:`StepIndexedSampler`),
and every item carries its stream position (with DDP, each rank reads its own block of every global
batch). A run resumed at optimizer step k restarts the
stream at position ``k * accumulate * batch_size``, so it sees exactly the batches (and, seeded by
the position, the noise) an uninterrupted run sees from step k on. The stream is endless:
``trainer.max_steps`` ends training, never an epoch boundary (Lightning cannot resume a plain
DataLoader mid-epoch, and would replay batches if it tried).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Sampler

from dreammix.data.frozen import CachedInpaintSet, FrozenInputEncoder, InputOptions, encode_examples
from dreammix.data.masks import MaskAugmentation
from dreammix.data.regular import has_regular_data, load_regular_examples
from dreammix.data.subjects import MISSING_MASK_POLICIES, SegmentMasks, Subject, load_source_examples
from dreammix.errors import DreamMixError


class StepIndexedSampler(Sampler[tuple[int, int]]):
    """The step-indexed stream of ``(position, item index)`` pairs, from global batch ``start_batch``.

    Position ``p`` is item ``perm_e[p % n]`` with ``e = p // n`` and ``perm_e`` a ``randperm``
    seeded by ``seed + e``: reshuffled every pass over the data, reproducible from any position.

    Data parallel (DDP, ``num_replicas`` ranks): global batch ``b`` is the ``num_replicas *
    batch_size`` consecutive positions from ``b * num_replicas * batch_size``; rank ``r`` reads the
    ``r``-th block of ``batch_size`` of it. So the ranks never read the same position, the global
    batch is ``num_replicas`` times the per-device one, and one rank's data (and, seeded by the
    position, its noise) depends only on ``(seed, b, r)`` — a run resumed at global batch ``b``
    reads exactly what an uninterrupted one reads from there. With one replica this is the plain
    stream ``start_batch * batch_size, …``.

    ``stop_batch``: the stream ends before that global batch (``__len__`` is then the number of
    pairs this rank yields); None = endless, without a length (the trainer stops at max_steps).
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, start_batch: int = 0, num_replicas: int = 1, rank: int = 0,
        stop_batch: int | None = None,
    ):  # fmt: skip
        if num_items < 1:
            raise ValueError("empty dataset")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.num_items, self.batch_size, self.seed, self.start_batch = num_items, batch_size, seed, start_batch
        self.num_replicas, self.rank, self.stop_batch = num_replicas, rank, stop_batch

    def __len__(self) -> int:
        if self.stop_batch is None:
            raise TypeError("an endless StepIndexedSampler has no length")
        return max(0, self.stop_batch - self.start_batch) * self.batch_size

    def __iter__(self):
        perm_epoch, perm = -1, None
        batch = self.start_batch
        while self.stop_batch is None or batch < self.stop_batch:
            first = (batch * self.num_replicas + self.rank) * self.batch_size
            for pos in range(first, first + self.batch_size):
                epoch, offset = divmod(pos, self.num_items)
                if epoch != perm_epoch:
                    perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
                    perm_epoch = epoch
                yield pos, int(perm[offset])
            batch += 1


class PositionedItems(torch.utils.data.Dataset):
    """Looks items up by the sampler's ``(position, index)`` keys and adds ``position``.

    ``__getitems__`` (used by the DataLoader for a whole batch) gathers the batch with one tensor
    index per field instead of collating item dicts one by one.
    """

    def __init__(self, dataset: CachedInpaintSet):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([key]).items()}

    def __getitems__(self, keys: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        positions, items = zip(*keys)
        return {**self.dataset.batch(torch.tensor(items)), "position": torch.tensor(positions)}


def _already_batched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


@dataclass(frozen=True)
class DataSpec:
    """``conf/data/*.yaml``: prompts, regular-set location, batch sizes, mask augmentation."""

    source_prompt: str
    regular_dir: str | None = None
    require_regular: bool = False
    max_regular: int | None = None
    batch_size: int = 1
    regular_batch_size: int = 1
    mask_variants: int = 4
    missing_mask: str = "full"
    mask_augmentation: MaskAugmentation = field(default_factory=MaskAugmentation)
    num_workers: int = 0
    # Crop / latents / mask mode of both sets (paper-text defaults; see conf/data/default.yaml).
    inputs: InputOptions = field(default_factory=InputOptions)
    regular_mask_variants: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.regular_batch_size < 1:
            raise DreamMixError("batch sizes must be >= 1", "data.batch_size")
        if self.mask_variants < 1:
            raise DreamMixError("mask_variants must be >= 1", "data.mask_variants")
        if self.regular_mask_variants < 1:
            raise DreamMixError("regular_mask_variants must be >= 1", "data.regular_mask_variants")
        if self.missing_mask not in MISSING_MASK_POLICIES:
            raise DreamMixError(f"must be one of {'|'.join(MISSING_MASK_POLICIES)}, got {self.missing_mask!r}",
                                "data.missing_mask")  # fmt: skip

    @classmethod
    def from_config(cls, cfg) -> "DataSpec":
        knobs = {"crop": "center", "vae_latents": "mean", "mask_mode": "augment", "blob_grow": (0.1, 1.0)}
        skip = {"mask_augmentation", "inputs", *knobs}
        values = {k: cfg[k] for k in cfg if k in cls.__dataclass_fields__ and k not in skip}
        try:
            augmentation = MaskAugmentation(**cfg.get("mask_augmentation", {}))
        except (TypeError, ValueError) as exc:
            raise DreamMixError(str(exc), "data.mask_augmentation") from exc
        chosen = {k: cfg.get(k, default) for k, default in knobs.items()}
        try:
            inputs = InputOptions(**{**chosen, "blob_grow": tuple(float(v) for v in chosen["blob_grow"])})
        except (TypeError, ValueError) as exc:
            raise DreamMixError(str(exc), "data.crop/vae_latents/mask_mode/blob_grow") from exc
        return cls(mask_augmentation=augmentation, inputs=inputs, **values)


class DreamMixDataModule(L.LightningDataModule):
    """Source set (subject photos + augmented masks) and regular set (ADM), encoded once."""

    def __init__(
        self,
        subject: Subject,
        spec: DataSpec,
        encoder: FrozenInputEncoder,
        resolution: int,
        use_regular: bool,
        seed: int = 0,
        segment_masks: SegmentMasks | None = None,
    ):
        super().__init__()
        self.subject, self.spec, self.encoder = subject, spec, encoder
        self.segment_masks = segment_masks  # data.missing_mask=segment (dreammix.data.segmented_masks)
        self.resolution, self.use_regular, self.seed = resolution, use_regular, seed
        self.source: CachedInpaintSet | None = None
        self.source_examples: list = []  # the decoded photos + masks (validation renders reuse them)
        self.regular: CachedInpaintSet | None = None

    def regular_available(self) -> bool:
        return has_regular_data(self.spec.regular_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.source is not None:
            return  # encoded once, even if Lightning calls setup again
        examples = self.source_examples = load_source_examples(self.subject, self.spec.missing_mask, self.segment_masks)
        self.source = encode_examples(
            examples,
            [self.spec.source_prompt],
            self.encoder,
            self.resolution,
            variants=self.spec.mask_variants,
            augmentation=self.spec.mask_augmentation,
            seed=self.seed,
            options=self.spec.inputs,
        )
        if not self.use_regular:
            return
        if not self.regular_available():
            message = (
                f"no regular data in {self.spec.regular_dir} (data.regular_dir): run `python src/adm.py "
                f"subject={self.subject.name}` to create it, or train without it (loss.beta=0 / experiment=dreambooth)"
            )
            if self.spec.require_regular:
                raise DreamMixError(message)
            warnings.warn(message + "; training on the source set only", stacklevel=2)
            return
        regular = load_regular_examples(Path(self.spec.regular_dir), limit=self.spec.max_regular)
        self.regular = encode_examples(
            regular, [r.prompt for r in regular], self.encoder, self.resolution, seed=self.seed,
            variants=self.spec.regular_mask_variants, options=self.spec.inputs,
        )  # fmt: skip

    def _loader(self, dataset: CachedInpaintSet, batch_size: int, seed: int) -> DataLoader:
        """This rank's slice of the endless stream from the trainer's step on (Lightning must not
        re-shard it: ``use_distributed_sampler=False`` in ``train``). Endless, not bounded at
        ``max_steps``: a finite epoch makes Lightning's mid-epoch restore replay batches."""
        trainer = self.trainer
        if trainer is None:
            sampler = StepIndexedSampler(len(dataset), batch_size, seed)
        else:
            sampler = StepIndexedSampler(
                len(dataset), batch_size, seed, start_batch=trainer.global_step * trainer.accumulate_grad_batches,
                num_replicas=trainer.world_size, rank=trainer.global_rank,
            )  # fmt: skip
        return DataLoader(
            PositionedItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=self.spec.num_workers,
            collate_fn=_already_batched,
        )

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Our batches are ``{part: {key: tensor}}``: move them directly (Lightning's generic
        collection walk costs a few ms per step, a measurable share of a small model's step)."""
        return {name: {k: v.to(device, non_blocking=True) for k, v in part.items()} for name, part in batch.items()}

    def train_dataloader(self) -> CombinedLoader:
        loaders = {"source": self._loader(self.source, self.spec.batch_size, self.seed)}
        if self.regular is not None:
            loaders["regular"] = self._loader(self.regular, self.spec.regular_batch_size, self.seed + 1)
        return CombinedLoader(loaders, mode="min_size")  # both endless: one batch of each per step
