"""One Lightning fit step on 2 CPU processes (strategy="ddp", gloo) with syncbn's LayerSync plugin.

Run as a script (``python tests/syncbn/lightning_fit.py OUT_DIR``): Lightning's DDP on CPU starts rank 1 by running
this file again. Each rank saves to ``OUT_DIR/rank{r}.pt`` the batch it trained on, the layer classes it saw while
training and after ``fit``, and its final state_dict, for ``test_lightning.py`` to compare with BatchNorm on the
global batch. The model builder and data live here so the test builds the reference from the same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import syncbn.lightning

LR = 0.1
SAMPLES = 10  # 5 per rank


def build_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
        nn.BatchNorm1d(3),
    ).double()


def make_data() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 0.5
    return TensorDataset(x, torch.randn(SAMPLES, 3, generator=gen, dtype=torch.float64))


def bn_classes(net: nn.Module) -> dict[str, str]:
    return {n: type(m).__qualname__ for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


class OneStep(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_net()
        self.seen: list[torch.Tensor] = []
        self.classes_in_training: dict[str, str] = {}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen.append(torch.cat([x.flatten(1), y], dim=1))
        self.classes_in_training = bn_classes(self.net)
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    module = OneStep()
    trainer = lightning.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        plugins=[syncbn.lightning.SyncBatchNorm()],
        precision="64-true",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, DataLoader(make_data(), batch_size=SAMPLES // 2, shuffle=False))
    torch.save(
        {
            "seen": torch.cat(module.seen),
            "classes_in_training": module.classes_in_training,
            "classes_after_fit": bn_classes(module.net),
            "state": module.net.state_dict(),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
