#!/usr/bin/env python
"""Standard versus robust training: PGD adversarial training (l-infinity, eps = 8/255)
and the same run without it, for the paper's standard-vs-robust comparison.

Both runs share the seed, data order and schedule; only the training inputs differ
(PGD examples with --pgd-steps steps of size --pgd-alpha for the robust run). Each
epoch reports clean accuracy and robust accuracy (PGD with --eval-steps steps on up to
--eval-batches validation batches).

Writes OUT/standard/ and OUT/robust/, each with checkpoints/epoch_NNNN.pt (epoch 0 =
before training) and conceptmon.yaml. Then:
  conceptmon dissect --config OUT/standard/conceptmon.yaml
  conceptmon dissect --config OUT/robust/conceptmon.yaml
  conceptmon compare OUT/standard/conceptmon_out OUT/robust/conceptmon_out --labels standard,robust

Examples:
  python scripts/train_pgd.py --dataset cifar10 --data /data/cifar --out runs/pgd
  python scripts/train_pgd.py --dataset synthetic --out runs/pgd_tiny --tiny
"""
from __future__ import annotations

import sys
import time

import torch

import _common as common
from conceptmon.training import (
    EpochRecord,
    Normalizer,
    PGDSettings,
    cosine_lr,
    evaluate,
    seed_everything,
    stderr_log,
    train_one_epoch,
)

MODES = ("standard", "robust")


def parser():
    p = common.base_parser(
        __doc__, dataset="cifar10", arch="resnet18", epochs=30, batch_size=128, lr=0.1,
        weight_decay=5e-4, image_size=None,
    )
    g = p.add_argument_group("adversarial training")
    g.add_argument("--mode", choices=("both",) + MODES, default="both",
                   help="train both runs (default), or only one of them")
    g.add_argument("--eps", type=float, default=8 / 255, help="l-infinity radius in [0,1] pixels (default 8/255)")
    g.add_argument("--pgd-alpha", type=float, default=2 / 255, help="PGD step size (default 2/255)")
    g.add_argument("--pgd-steps", type=int, default=10, help="PGD steps while training (default 10)")
    g.add_argument("--eval-steps", type=int, default=20, help="PGD steps for robust accuracy (default 20)")
    g.add_argument("--eval-batches", type=int, default=10,
                   help="validation batches used for robust accuracy (PGD is costly; default 10)")
    return p


def train_run(args, mode: str, data, device) -> None:
    seed_everything(args.seed)  # same init and data order for both runs
    attack_gen = torch.Generator().manual_seed(args.seed + 1)
    train_dl, val_dl = common.loaders(data, args, device)
    model, kwargs = common.make_model(args.arch, data.num_classes)
    model.to(device)
    run = common.RunFolder(args.out / mode)
    config = run.write_config(args, arch=args.arch, kwargs=kwargs, mean=data.mean, std=data.std,
                              run=f"{args.out.resolve().name}-{mode}")
    normalize = Normalizer(data.mean, data.std)
    train_attack = PGDSettings(args.eps, args.pgd_alpha, args.pgd_steps) if mode == "robust" else None
    eval_attack = PGDSettings(args.eps, args.pgd_alpha, args.eval_steps)
    eval_batches = min(args.eval_batches, args.max_steps or args.eval_batches)
    steps_per_epoch = min(len(train_dl), args.max_steps or len(train_dl))
    total_steps = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, nesterov=args.momentum > 0)

    def measure(epoch, loss, acc, start):
        clean = evaluate(model, val_dl, normalize, device, max_steps=args.max_steps)
        robust = evaluate(model, val_dl, normalize, device, adversary=eval_attack, max_steps=eval_batches,
                          generator=attack_gen)
        run.save(model, epoch, val_acc=clean, robust_acc=robust, mode=mode, eps=args.eps, seed=args.seed)
        run.record(EpochRecord(epoch, loss, acc, clean, time.monotonic() - start, extra={"robust_acc": robust}),
                   unit=f"{mode} epoch")

    stderr_log(f"{mode} run: {'PGD' if train_attack else 'clean'} training, config {config}")
    measure(0, None, None, time.monotonic())
    step = 0
    for epoch in range(1, args.epochs + 1):
        start = time.monotonic()
        loss, acc, taken = train_one_epoch(
            model, train_dl, opt, normalize, device, lr_at=lambda s: cosine_lr(args.lr, s, total_steps),
            first_step=step, adversary=train_attack, max_steps=args.max_steps, progress=stderr_log,
            generator=attack_gen,
        )
        step += taken
        measure(epoch, loss, acc, start)
    print(f"{mode}: checkpoints in {run.checkpoints}; next: conceptmon dissect --config {config}")


def main(argv=None) -> None:
    args = common.finish_args(parser().parse_args(argv))
    if args.tiny:
        args.pgd_steps, args.eval_steps, args.eval_batches = 1, 1, 1
    for name in ("pgd_steps", "eval_steps", "eval_batches"):
        if getattr(args, name) < 1:
            common.fail(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not 0 < args.eps <= 1:
        common.fail(f"--eps: must be in (0, 1] (pixel units, e.g. 0.0314 for 8/255), got {args.eps}")
    device = common.pick_device(args.device)
    seed_everything(args.seed)
    data = common.load_data(args)
    for mode in MODES if args.mode == "both" else (args.mode,):
        train_run(args, mode, data, device)
    if args.mode == "both":
        print(f"compare: conceptmon compare {args.out / 'standard' / 'conceptmon_out'} "
              f"{args.out / 'robust' / 'conceptmon_out'} --labels standard,robust")


if __name__ == "__main__":
    sys.exit(common.run_main(main))
