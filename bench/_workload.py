"""The training workloads of the network benchmarks (``comm_bench.py``, ``overlap_bench.py``).

:class:`Workload` builds one rank's model and optimizer from the same seed on every rank, hands out
that rank's batch of each step (a fixed permutation split across the ranks, so every method sees the
same data in the same order) and measures test accuracy.

Workloads (``args.model``):

- ``mlp``: the project's MNIST MLP (``mlp(hidden=args.hidden, depth=2)``), SGD lr 0.05, momentum 0.9;
- ``mnist``: the project's MNIST CNN (``mnist_cnn`` as ``conf/model/mnist_cnn.yaml``: 16 channels,
  hidden 128), AdamW lr 3e-3, weight decay 0.01;
- ``minilm``: the ``bert_bbc`` recipe's all-MiniLM-L6-v2 on BBC News (max length 128), AdamW lr 2e-4,
  weight decay 0.01 (offline packages, see the README's set-up).

Example::

    work = Workload(args, rank=dist.get_rank(), world=dist.get_world_size())
    ddp = DistributedDataParallel(work.model)
    for step in range(args.steps):
        work.optimizer.zero_grad()
        work.loss(ddp, step).backward()
        work.optimizer.step()
    print(work.test_accuracy())
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["MODELS", "Workload"]

MODELS = ("mlp", "mnist", "minilm")


class Workload:
    """Model, optimizer, this rank's batches and the test accuracy of one benchmark workload.

    Args:
        args: the script's arguments; read: ``model`` (one of :data:`MODELS`), ``batch_size`` (per
            rank), ``hidden`` (``mlp`` only), ``steps`` and ``lr_schedule`` (``constant`` or ``linear``:
            10 warm-up steps, then linear decay to 0 at ``steps``).
        rank: this rank.
        world: number of ranks (each step consumes ``world * batch_size`` training examples).

    Raises:
        SystemExit: ``args.model`` is not one of :data:`MODELS`.
    """

    def __init__(self, args: argparse.Namespace, rank: int, world: int) -> None:
        import torch

        if args.model not in MODELS:
            raise SystemExit(f"--model {args.model!r} is unknown; valid: {', '.join(MODELS)}")
        self.args, self.rank, self.world = args, rank, world
        if args.model in ("mlp", "mnist"):
            from lit_parallel.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist
            from lit_parallel.models import mlp, mnist_cnn

            raw = load_mnist()

            def norm(x: torch.Tensor) -> torch.Tensor:
                return ((x.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)

            self.train_x, self.train_y = norm(raw["train_images"]), raw["train_labels"]
            self.test_x, self.test_y = norm(raw["test_images"]), raw["test_labels"]
            torch.manual_seed(0)
            if args.model == "mlp":
                self.model = mlp(hidden=args.hidden, depth=2)
                self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
            else:
                self.model = mnist_cnn(channels=16, hidden=128)
                self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.01)
            self.num_train = len(self.train_x)
        else:  # minilm: all-MiniLM-L6-v2 on BBC News, as recipes/bert_bbc.yaml (offline packages)
            from lit_parallel.data import TextClassificationDataModule
            from lit_parallel.data.text import PaddingCollator
            from lit_parallel.models.loading import load_sequence_classifier

            data = TextClassificationDataModule("minilm", max_length=128, batch_size=args.batch_size)
            data.setup("fit")
            self.train_set, self.test_set = data._splits["train"], data._splits["test"]
            self.collate = PaddingCollator(data.tokenizer.pad_token_id)
            torch.manual_seed(0)
            self.model = load_sequence_classifier("minilm", num_labels=5)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-4, weight_decay=0.01)
            self.num_train = len(self.train_set)
        self.order = torch.randperm(self.num_train, generator=torch.Generator().manual_seed(1))
        self.scheduler = None
        if args.lr_schedule == "linear":  # the recipes' schedule: linear warm-up, then linear decay to 0
            warmup, total = 10, args.steps

            def factor(step: int) -> float:
                return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))

            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    @property
    def description(self) -> str:
        """The workload in words, for table captions."""
        params = sum(p.numel() for p in self.model.parameters())
        what = {"mlp": f"MNIST MLP hidden={self.args.hidden}", "mnist": "MNIST CNN (mnist_cnn, 16 channels)",
                "minilm": "all-MiniLM-L6-v2 + 5-class head on BBC News"}[self.args.model]
        return f"{what} ({params / 1e6:.2f}M params)"

    def loss(self, net: Any, step: int) -> Any:
        """The training loss of this rank's batch of ``step`` through ``net`` (the model or its wrapper)."""
        import torch.nn.functional as F

        batch = self.args.batch_size
        steps_per_epoch = self.num_train // (batch * self.world)
        start = ((step % steps_per_epoch) * self.world + self.rank) * batch
        idx = self.order[start : start + batch]
        if self.args.model != "minilm":
            return F.cross_entropy(net(self.train_x[idx]), self.train_y[idx])
        inputs = self.collate([self.train_set[int(i)] for i in idx])
        labels = inputs.pop("labels")
        return F.cross_entropy(net(**inputs).logits, labels)

    def test_accuracy(self) -> float:
        """Accuracy of this rank's model on the whole test set."""
        import torch

        self.model.eval()
        with torch.no_grad():
            if self.args.model != "minilm":
                correct = total = 0
                for start in range(0, len(self.test_y), 2000):  # bounded activations for the CNN
                    logits = self.model(self.test_x[start : start + 2000])
                    correct += (logits.argmax(1) == self.test_y[start : start + 2000]).sum().item()
                total = len(self.test_y)
            else:
                correct = total = 0
                for start in range(0, len(self.test_set), 64):
                    inputs = self.collate([self.test_set[i] for i in range(start, min(start + 64,
                                                                                      len(self.test_set)))])
                    labels = inputs.pop("labels")
                    correct += (self.model(**inputs).logits.argmax(1) == labels).sum().item()
                    total += len(labels)
        self.model.train()
        return correct / total
