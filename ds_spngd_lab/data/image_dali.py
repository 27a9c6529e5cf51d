"""NVIDIA DALI pipelines for image folders (optional extra ``ds_spngd[dali]``).

Training: ``fn.readers.file`` over the explicit file/label lists, sharded with ``shard_id=rank`` /
``num_shards=world`` and ``shuffle_after_epoch=True`` (one global permutation per DALI epoch from ``seed``, shared
by all shards: the Goyal et al. scheme), decoded with ``fn.decoders.image`` ("mixed" = nvJPEG on a GPU, "cpu"
otherwise), shorter side resized to ``S * 256/224``, random ``S x S`` crop, random horizontal flip, ImageNet
normalisation, CHW float32. The reader streams across its epochs; one training "epoch" here is exactly
``steps_per_epoch * gas`` micro-batches on every rank (``n // global_batch`` steps), so all ranks take the same number
of steps (the up to ``global_batch - 1`` samples per epoch that are not consumed shift into the next DALI epoch).

Evaluation: no shuffling, ``pad_last_batch=True`` and ``stick_to_shard=True``; DALI's shard of rank ``r`` is
``[n*r // world, n*(r+1) // world)`` (the same as :func:`ds_spngd_lab.data.sampler.shard_range`), and the padded tail
of the last batch is cut off so every image is counted once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from ds_spngd_lab.data.image_constants import MEAN, RESIZE_RATIO, STD
from ds_spngd_lab.data.sampler import BatchPlan, shard_range, steps_per_epoch

READER = "Reader"


def _to_torch(out: Any, device: torch.device) -> torch.Tensor:
    """Copy one DALI output batch (dense TensorList) into a new torch tensor on ``device``.

    The copy matters: DALI reuses its output buffers on the next ``run()``.
    """
    tensor = out.as_tensor()
    return torch.from_dlpack(tensor).to(device, copy=True)


class DaliImageBatches:
    """DALI-decoded batches with the :class:`ds_spngd_lab.data.image_folder.BatchSource` interface.

    Args:
        files / labels: the images and their class indices (equal, non-zero length).
        plan: rank / world / micro-batch layout; ``plan.micro_batch`` is the training pipeline's batch size.
        image_size: crop side ``S``.
        train: augmenting, sharded-shuffled training pipeline (True) or sequential evaluation pipeline (False).
        num_threads: DALI CPU worker threads.

    Raises:
        ValueError: empty or mismatched file / label lists.
        RuntimeError: from DALI at ``run()`` time if an image cannot be decoded (DALI names the file).
    """

    def __init__(
        self,
        files: tuple[str, ...],
        labels: tuple[int, ...],
        plan: BatchPlan,
        image_size: int,
        train: bool,
        num_threads: int = 2,
    ) -> None:
        if len(files) != len(labels) or not files:
            raise ValueError(f"need equally many (>0) files and labels, got {len(files)} and {len(labels)}")
        self.files = list(files)
        self.labels = list(labels)
        self.plan = plan
        self.image_size = image_size
        self.train = train
        self.num_threads = num_threads
        self.gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.gpu else torch.device("cpu")
        self._pipes: dict[int, Any] = {}

    @property
    def steps_per_epoch(self) -> int:
        """``len(files) // plan.global_batch`` (ValueError if 0)."""
        return steps_per_epoch(len(self.files), self.plan.global_batch)

    def _pipeline(self, batch_size: int) -> Any:
        """Build (once per batch size) and return the DALI pipeline."""
        if batch_size in self._pipes:
            return self._pipes[batch_size]
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        size = self.image_size
        short = max(size, int(round(size * RESIZE_RATIO)))

        @pipeline_def  # type: ignore[untyped-decorator]
        def build() -> tuple[Any, Any]:
            if self.train:
                jpegs, labels = fn.readers.file(
                    files=self.files,
                    labels=self.labels,
                    shard_id=self.plan.rank,
                    num_shards=self.plan.world,
                    shuffle_after_epoch=True,
                    seed=self.plan.seed,
                    name=READER,
                )
            else:
                jpegs, labels = fn.readers.file(
                    files=self.files,
                    labels=self.labels,
                    shard_id=self.plan.rank,
                    num_shards=self.plan.world,
                    random_shuffle=False,
                    pad_last_batch=True,
                    stick_to_shard=True,
                    name=READER,
                )
            rgb = types.RGB  # type: ignore[attr-defined]
            images: Any = fn.decoders.image(jpegs, device="mixed" if self.gpu else "cpu", output_type=rgb)
            images = fn.resize(images, resize_shorter=short)
            common = dict(
                crop=(size, size),
                dtype=types.FLOAT,  # type: ignore[attr-defined]
                output_layout="CHW",
                mean=[255.0 * m for m in MEAN],
                std=[255.0 * s for s in STD],
            )
            if self.train:
                images = fn.crop_mirror_normalize(
                    images,
                    crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                    crop_pos_y=fn.random.uniform(range=(0.0, 1.0)),
                    mirror=fn.random.coin_flip(probability=0.5),
                    **common,
                )
            else:
                images = fn.crop_mirror_normalize(images, **common)
            return images, labels

        pipe = build(
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=torch.cuda.current_device() if self.gpu else None,
            seed=self.plan.seed + 1000 * self.plan.rank,
        )
        pipe.build()
        self._pipes[batch_size] = pipe
        return pipe

    def _run(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = pipe.run()
        x = _to_torch(images, self.device)
        y = _to_torch(labels, self.device).reshape(-1).to(torch.int64)
        return x, y

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``steps_per_epoch * gas`` training micro-batches ``(x (b, 3, S, S), y (b,))``.

        ``epoch`` is not used to reseed: DALI's reader keeps its own epoch counter and reshuffles after each of its
        epochs (see the module docstring). Raises RuntimeError for an evaluation pipeline.
        """
        if not self.train:
            raise RuntimeError("this DALI source was built for evaluation (train=False)")
        pipe = self._pipeline(self.plan.micro_batch)
        for _ in range(self.steps_per_epoch * self.plan.gas):
            yield self._run(pipe)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's evaluation shard once, in order, ``batch_size`` images at a time (padding removed)."""
        if self.train:
            raise RuntimeError("this DALI source was built for training (train=True)")
        start, stop = shard_range(len(self.files), self.plan.rank, self.plan.world)
        remaining = stop - start
        pipe = self._pipeline(batch_size)
        for _ in range(math.ceil(remaining / batch_size)):
            x, y = self._run(pipe)
            take = min(batch_size, remaining)
            remaining -= take
            yield x[:take], y[:take]
