"""FLoRA end to end on scikit-learn's handwritten digits (8x8 images, no download).

1. Pretrain a small CNN (3 Conv2d + 2 Linear) on digits 0-4.
2. Adapt it to digits 5-9 (labels 5..9 mapped to 0..4, a NEW 5-way head) three ways, each
   for the same number of epochs and from the same pretrained weights and the same new head:
     (a) FLoRA on every conv and the hidden linear (+ the new head via modules_to_save),
     (b) full fine-tuning (everything trainable, new head too),
     (c) head only (the pretrained features frozen, only the new head trains).
3. Print test accuracy, trainable parameters and training time of each in one table.
4. Show that the FLoRA model merges away (``merge_and_unload`` leaves plain Conv2d/Linear
   modules with the same test accuracy) and round-trips through ``save_flora``/``load_flora``
   into a fresh copy of the pretrained model (same accuracy).

Run:

    python examples/finetune_digits.py                 # the full run, 15-30 s on one CPU core
    python examples/finetune_digits.py --quick         # smoke run (a few seconds)
    python examples/finetune_digits.py --eval-split val  # evaluate on a validation split carved
                                                         # from the training data (for tuning)

The default hyperparameters were chosen on ``--eval-split val`` (never on the test split);
see examples/README.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

try:
    import flora_kernels as fk
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import flora_kernels as fk

SPLIT_SEED = 0  # the train/test split is fixed, whatever --seed is
TEST_FRACTION = 0.25
VAL_FRACTION = 0.25  # of the training part, only with --eval-split val
TARGETS = ["conv1", "conv2", "conv3", "fc1"]  # what FLoRA adapts; "head" is the new classifier


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Split:
    x_train: Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: Tensor  # (N,) int64 in 0..4
    x_test: Tensor
    y_test: Tensor


def load_task(digits: Sequence[int], eval_split: str = "test") -> Split:
    """Images of ``digits``, labels remapped to 0..len(digits)-1, fixed stratified split.

    ``eval_split="val"`` holds out a stratified validation part of the training data instead
    of the test split (the test images are then not touched at all).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.images, data.target
    keep = [i for i, t in enumerate(y) if t in digits]
    x, y = x[keep], y[keep]
    label = {d: i for i, d in enumerate(digits)}
    y = [label[int(t)] for t in y]
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    if eval_split == "val":
        x_tr, x_te, y_tr, y_te = train_test_split(
            x_tr, y_tr, test_size=VAL_FRACTION, stratify=y_tr, random_state=SPLIT_SEED
        )
    elif eval_split != "test":
        raise ValueError(f"eval_split: expected 'test' or 'val', got {eval_split!r}")

    def tx(a) -> Tensor:  # pixel values are 0..16
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 16.0

    def ty(a) -> Tensor:
        return torch.tensor(a, dtype=torch.int64)

    return Split(tx(x_tr), ty(y_tr), tx(x_te), ty(y_te))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """8x8 -> conv(16) -> conv(32) -> pool -> conv(64) -> pool -> fc(128) -> head(classes)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 2x2
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of ``model`` with a freshly initialised ``head`` (the same for every method)."""
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    m.head = nn.Linear(m.head.in_features, num_classes)
    return m


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def logits(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return model(x)


def trainable(model: nn.Module) -> int:
    return fk.param_summary(model).trainable


def train(
    model: nn.Module, data: Split, *, epochs: int, lr: float, batch_size: int, seed: int,
    desc: str, weight_decay: float = 0.0, progress: bool = True,
) -> float:
    """Adam + cosine decay over the trainable parameters; returns the training wall time (s).

    The batch order depends only on ``seed``, so every method sees the same batches.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    n = len(data.y_train)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # adapter dropout, if any
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=True, file=sys.stderr)
    for _ in bar:
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            xb, yb = data.x_train[idx], data.y_train[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            loss_sum += loss.item() * len(yb)
        bar.set_postfix(loss=f"{loss_sum / total:.4f}", train_acc=f"{correct / total:.3f}")
    bar.close()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# The three ways to adapt
# --------------------------------------------------------------------------------------------


def flora_config(args: argparse.Namespace) -> fk.FLoRAConfig:
    return fk.FLoRAConfig(
        rank=args.rank, kernel_rank=args.kernel_rank, scale=args.scale, dropout=args.dropout,
        target_modules=TARGETS, modules_to_save=["head"], backend=args.backend, lean_memory=args.lean_memory,
    )


def make_flora(start: nn.Module, args: argparse.Namespace) -> nn.Module:
    return fk.inject_flora(copy.deepcopy(start), flora_config(args))


def make_full(start: nn.Module, args: argparse.Namespace) -> nn.Module:
    m = copy.deepcopy(start)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def make_head_only(start: nn.Module, args: argparse.Namespace) -> nn.Module:
    m = copy.deepcopy(start)
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith("head."))
    return m


@dataclass
class Result:
    method: str
    accuracy: float
    trainable: int
    seconds: float
    lr: float


def format_table(results: Sequence[Result], full_params: int, split_name: str = "test") -> str:
    header = f"{'method':<28} {split_name + ' acc':>9} {'trainable params':>17} {'% of full FT':>13} {'lr':>8} {'train time (s)':>15}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.method:<28} {r.accuracy:>9.4f} {r.trainable:>17,} {100.0 * r.trainable / full_params:>12.2f}% "
            f"{r.lr:>8.0e} {r.seconds:>15.2f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=40, help="adaptation epochs, the same for all three methods")
    p.add_argument("--pretrain-epochs", type=int, default=40, help="epochs of pretraining on digits 0-4")
    p.add_argument("--rank", type=int, default=4, help="FLoRA channel rank (r_out = r_in)")
    p.add_argument("--kernel-rank", type=int, default=None, help="FLoRA rank of each 3x3 kernel mode (default: full, 3)")
    p.add_argument("--scale", type=float, default=1.0, help="FLoRA scale s in dW = s * G x_n U_n")
    p.add_argument("--dropout", type=float, default=0.0, help="FLoRA adapter dropout")
    p.add_argument("--lean-memory", action="store_true",
                   help="FLoRA lean_memory: the input factors stay frozen (LoRA-FA style; docs/memory.md)")
    p.add_argument("--lr-flora", type=float, default=2e-2, help="Adam learning rate for FLoRA (core starts at 0)")
    p.add_argument("--lr-full", type=float, default=1e-2, help="Adam learning rate for full fine-tuning")
    p.add_argument("--lr-head", type=float, default=1e-1, help="Adam learning rate for head-only training")
    p.add_argument("--lr-pretrain", type=float, default=3e-3, help="Adam learning rate for pretraining")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda", "cpp"),
                   help="flora_kernels backend of the adapter layers")
    p.add_argument("--seed", type=int, default=0, help="seed for init, new head and batch order (the split is fixed)")
    p.add_argument("--eval-split", choices=("test", "val"), default="test",
                   help="'val' evaluates on a validation part of the training data (use it for tuning)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); the model is tiny, and more threads only "
                        "add synchronisation, which is very slow on a shared machine")
    p.add_argument("--save-dir", default=None, help="where to save the adapter (default: a temporary directory)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    p.add_argument("--quick", action="store_true", help="very short smoke run (2 epochs each); accuracies are meaningless")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.pretrain_epochs = min(args.pretrain_epochs, 2)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run everything; prints the table and returns the numbers (used by the tests)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # callers (e.g. the tests) keep their setting


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    show = not args.no_progress
    split_name = "test" if args.eval_split == "test" else "val"

    # 1. Pretrain on 0-4.
    old = load_task(range(5), args.eval_split)
    new = load_task(range(5, 10), args.eval_split)
    print(f"digits 0-4: {len(old.y_train)} train / {len(old.y_test)} {split_name};  "
          f"digits 5-9: {len(new.y_train)} train / {len(new.y_test)} {split_name}")
    torch.manual_seed(args.seed)
    base = DigitsCNN(5)
    t = train(base, old, epochs=args.pretrain_epochs, lr=args.lr_pretrain, batch_size=args.batch_size,
              seed=args.seed, desc="pretrain 0-4", progress=show)
    base_acc = accuracy(base, old.x_test, old.y_test)
    print(f"pretrained on digits 0-4: {split_name} acc {base_acc:.4f} ({t:.1f} s, {trainable(base):,} params)")
    for p in base.parameters():
        p.requires_grad_(False)

    # 2. Adapt to 5-9: the same pretrained weights, the same fresh 5-way head, the same batches.
    start = new_head(base, 5, seed=args.seed + 1)
    methods = [
        ("FLoRA (convs+fc1) + new head", make_flora, args.lr_flora),
        ("full fine-tuning", make_full, args.lr_full),
        ("head only (frozen features)", make_head_only, args.lr_head),
    ]
    results, models = [], {}
    for name, make, lr in methods:
        torch.manual_seed(args.seed + 3)  # FLoRA's factor init: independent of what ran before
        model = make(start, args)
        secs = train(model, new, epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                     seed=args.seed + 2, desc=name.split(" (")[0], progress=show)
        results.append(Result(name, accuracy(model, new.x_test, new.y_test), trainable(model), secs, lr))
        models[name] = model
    flora = models[methods[0][0]]
    head_only = models[methods[2][0]]
    # (c) really kept the pretrained features: only the head moved.
    for (n, p), (_, p0) in zip(head_only.named_parameters(), start.named_parameters()):
        assert n.startswith("head.") or torch.equal(p, p0), f"head-only run changed {n}"

    print()
    print(f"FLoRA config: rank={args.rank}, kernel_rank={args.kernel_rank}, scale={args.scale}, "
          f"dropout={args.dropout}, lean_memory={args.lean_memory}, targets={TARGETS}, modules_to_save=['head'], "
          f"backend={args.backend}")
    print(f"FLoRA {fk.param_summary(flora)}")
    print()
    full_params = results[1].trainable
    print(f"Adapting digits 0-4 -> 5-9, {args.epochs} epochs each, seed {args.seed}, {split_name} split:")
    print(format_table(results, full_params, split_name))
    print()

    # 3. Merge away: plain modules, same predictions.
    flora_acc = results[0].accuracy
    flora_logits = logits(flora, new.x_test)
    merged = fk.merge_and_unload(copy.deepcopy(flora))
    leftover = [n for n, m in merged.named_modules() if isinstance(m, fk.FLoRALayer)]
    plain = all(type(getattr(merged, n)) in (nn.Conv2d, nn.Linear) for n in TARGETS + ["head"])
    merged_acc = accuracy(merged, new.x_test, new.y_test)
    merged_diff = (logits(merged, new.x_test) - flora_logits).abs().max().item()
    print(f"merge_and_unload: FLoRA layers left {len(leftover)}, plain Conv2d/Linear modules: {plain}, "
          f"{split_name} acc {merged_acc:.4f} (adapter model {flora_acc:.4f}), max |logit diff| {merged_diff:.2e}")

    # 4. Save / load into a fresh copy of the pretrained model with a different random head.
    with tempfile.TemporaryDirectory() as tmp:
        path = args.save_dir or os.path.join(tmp, "digits_5_9_flora")
        fk.save_flora(flora, path)
        files = sorted(os.listdir(path))
        size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
        fresh = fk.load_flora(new_head(base, 5, seed=args.seed + 1000), path)
        loaded_acc = accuracy(fresh, new.x_test, new.y_test)
        loaded_diff = (logits(fresh, new.x_test) - flora_logits).abs().max().item()
    print(f"save_flora/load_flora: {files} ({size / 1024:.1f} KiB), {split_name} acc {loaded_acc:.4f}, "
          f"max |logit diff| {loaded_diff:.2e}")

    total = time.perf_counter() - t_start
    print(f"total time {total:.1f} s")
    return {
        "base_acc": base_acc,
        "results": results,
        "merged_acc": merged_acc,
        "merged_plain": plain and not leftover,
        "merged_max_diff": merged_diff,
        "loaded_acc": loaded_acc,
        "loaded_max_diff": loaded_diff,
        "seconds": total,
    }


if __name__ == "__main__":
    main()
