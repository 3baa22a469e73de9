"""One Lightning DDP training run on 2 CPU ranks, for tests/e2e/test_lightning.py:

    python tests/support/lightning_run.py BACKEND OUT_DIR

Lightning's default launcher starts rank 1 by running this script again (as a user's script would be),
so it lives in a file, not in the test. Each rank writes OUT_DIR/BACKEND-RANK.json: the backend its
group really used, the losses it saw, and its parameters' bytes before and after training."""
import json
import pathlib
import sys

import torch
import torch.distributed as dist

import pycoll.torch  # noqa: F401  registers the "pycoll" backend (the tests turn torch's autoload off)
import lightning as L
from lightning.pytorch.strategies import DDPStrategy

STEPS = 4


def _raw(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy().tobytes().hex()


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same start on both ranks and both backends
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        self.initial = _raw(self.net)
        self.losses = []

    def training_step(self, batch, _):
        loss = self.net(batch[0]).square().mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        rank = dist.get_rank()
        record = {"backend": dist.get_backend(), "world": dist.get_world_size(), "rank": rank,
                  "steps": self.trainer.global_step, "losses": self.losses,
                  "initial": self.initial, "final": _raw(self.net)}
        (pathlib.Path(sys.argv[2]) / f"{sys.argv[1]}-{rank}.json").write_text(json.dumps(record))


def main():
    backend = sys.argv[1]
    # 64 rows, batches of 8: the DistributedSampler Lightning adds gives each rank its own half
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend=backend),
                        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))


if __name__ == "__main__":
    main()
