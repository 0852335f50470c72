"""A tiny local model with its optimizer, scheduler and resumable loader: the state most tests checkpoint.

A module of its own (not conftest.py) so that child processes and test files can import it by a unique name."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from hf_rl_ckpt import ResumableDataLoader
from hf_rl_ckpt.testing.tiny import build_model


@dataclass
class TrainingObjects:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: ResumableDataLoader

    def as_kwargs(self) -> dict[str, Any]:
        return dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, dataloader=self.loader)

    def endless_batches(self) -> Iterator[torch.Tensor]:
        """Batches across epoch boundaries, each epoch a fresh pass of the resumable loader."""
        while True:
            yield from self.loader

    def train_step(self, batch: torch.Tensor) -> float:
        loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return loss.item()


def make_training_objects(seed: int = 0, **model_overrides: Any) -> TrainingObjects:
    """Model, AdamW, a warm-up scheduler and a shuffled loader over fixed random token data."""
    model = build_model("llama", seed=seed, **model_overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
    data = torch.randint(0, model.config.vocab_size, (24, 16), generator=torch.Generator().manual_seed(1234))
    loader = ResumableDataLoader(DataLoader(data, batch_size=4, shuffle=True))
    return TrainingObjects(model, optimizer, scheduler, loader)
