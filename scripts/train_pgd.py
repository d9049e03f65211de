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

import torch

from casestudies import fail
from casestudies.datasets import load_data, loaders
from casestudies.options import base_parser, finish_args, pick_device, run_main
from casestudies.pgd import PGDSettings, adversarial_inputs
from casestudies.runs import RunFolder, make_model, sgd
from conceptmon.demo.data import Normalizer
from conceptmon.demo.loop import evaluate, seed_everything, stderr_log

MODES = ("standard", "robust")


def parser():
    p = base_parser(
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
    train_dl, val_dl = loaders(data, args, device)
    model, kwargs = make_model(args.arch, data.num_classes)
    model.to(device)
    run = RunFolder(args.out / mode)
    config = run.write_config(args, arch=args.arch, kwargs=kwargs, mean=data.mean, std=data.std,
                              run=f"{args.out.resolve().name}-{mode}")
    normalize = Normalizer(data.mean, data.std)
    train_attack = PGDSettings(args.eps, args.pgd_alpha, args.pgd_steps) if mode == "robust" else None
    eval_attack = adversarial_inputs(PGDSettings(args.eps, args.pgd_alpha, args.eval_steps), normalize, attack_gen)
    eval_batches = min(args.eval_batches, args.max_steps or args.eval_batches)
    opt = sgd(model.parameters(), args)

    def robust_accuracy(model) -> dict:
        return {"robust_acc": evaluate(model, val_dl, normalize, device, inputs=eval_attack, max_steps=eval_batches)}

    stderr_log(f"{mode} run: {'PGD' if train_attack else 'clean'} training, config {config}")
    run.fit(model, train_dl, val_dl, opt, normalize, device, args, unit=f"{mode} epoch",
            inputs=adversarial_inputs(train_attack, normalize, attack_gen) if train_attack else None,
            measure=robust_accuracy, mode=mode, eps=args.eps, seed=args.seed)
    print(f"{mode}: checkpoints in {run.checkpoints}; next: conceptmon dissect --config {config}")


def main(argv=None) -> None:
    args = finish_args(parser().parse_args(argv))
    if args.tiny:
        args.pgd_steps, args.eval_steps, args.eval_batches = 1, 1, 1
    for name in ("pgd_steps", "eval_steps", "eval_batches"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not 0 < args.eps <= 1:
        fail(f"--eps: must be in (0, 1] (pixel units, e.g. 0.0314 for 8/255), got {args.eps}")
    device = pick_device(args.device)
    seed_everything(args.seed)
    data = load_data(args)
    for mode in MODES if args.mode == "both" else (args.mode,):
        train_run(args, mode, data, device)
    if args.mode == "both":
        print(f"compare: conceptmon compare {args.out / 'standard' / 'conceptmon_out'} "
              f"{args.out / 'robust' / 'conceptmon_out'} --labels standard,robust")


if __name__ == "__main__":
    sys.exit(run_main(main))
