#!/usr/bin/env python
"""Lottery-ticket study: iterative magnitude pruning with weight rewinding.

Stage 0 trains the dense network for --epochs. Each later stage removes --prune-fraction
(default 40 %) of the remaining convolution and linear weights with the smallest
magnitude (ranked globally), rewinds the surviving weights to their values after
--rewind epochs of stage 0 (0, 5 or 16 in the paper), and trains the rest of the
schedule again with the mask held fixed.

Writes, with the stage number as the epoch so that conceptmon treats stages as a sequence:
  OUT/checkpoints/epoch_SSSS.pt   the trained network of stage S (pruned weights are zeros,
                                  a plain state_dict: no pruning re-parametrisation inside)
  OUT/rewound/epoch_SSSS.pt       the rewound initialisation stage S started from
  OUT/conceptmon.yaml             dissects the trained stages   (results in OUT/conceptmon_out)
  OUT/conceptmon_rewound.yaml     dissects the rewound inits    (results in OUT/conceptmon_out_rewound)

Examples:
  python scripts/train_lth.py --dataset cifar10 --data /data/cifar --out runs/lth_r5 --rewind 5 --stages 5
  python scripts/train_lth.py --dataset synthetic --out runs/lth_tiny --tiny
"""
from __future__ import annotations

import copy
import sys
import time

from casestudies import fail
from casestudies.lottery import apply_masks, global_magnitude_masks, sparsity
from casestudies.options import base_parser, finish_args, run_main
from casestudies.runs import RunFolder, set_up, sgd
from conceptmon.demo.data import Normalizer
from conceptmon.demo.loop import EpochRecord, Schedule, evaluate, stderr_log, train_epochs


def parser():
    p = base_parser(
        __doc__, dataset="cifar10", arch="resnet18", epochs=30, batch_size=256, lr=0.1,
        weight_decay=5e-4, image_size=None,
    )
    g = p.add_argument_group("pruning")
    g.add_argument("--stages", type=int, default=5, help="pruning stages after the dense one (default 5)")
    g.add_argument("--prune-fraction", type=float, default=0.4,
                   help="share of the remaining weights removed per stage (default 0.4)")
    g.add_argument("--rewind", type=int, default=0,
                   help="epoch of stage 0 the surviving weights are reset to (the paper: 0, 5 or 16)")
    return p


def main(argv=None) -> None:
    args = finish_args(parser().parse_args(argv))
    if args.tiny:
        args.stages = min(args.stages, 1)
        args.rewind = min(args.rewind, 0)
    if args.stages < 1:
        fail(f"--stages: must be at least 1, got {args.stages}")
    if not 0 < args.prune_fraction < 1:
        fail(f"--prune-fraction: must be between 0 and 1, got {args.prune_fraction}")
    if not 0 <= args.rewind < args.epochs:
        fail(f"--rewind: must be between 0 and --epochs - 1 = {args.epochs - 1}, got {args.rewind}")

    setup = set_up(args)
    data, device, model, kwargs = setup.data, setup.device, setup.model.to(setup.device), setup.kwargs
    train_dl, val_dl = setup.train_dl, setup.val_dl
    trained = RunFolder(args.out, "checkpoints")
    rewound = RunFolder(args.out, "rewound")
    name = args.out.resolve().name
    config = trained.write_config(args, arch=args.arch, kwargs=kwargs, mean=data.mean, std=data.std, run=name)
    rewound.write_config(args, arch=args.arch, kwargs=kwargs, mean=data.mean, std=data.std,
                         run=f"{name}-rewound", name="conceptmon_rewound.yaml",
                         dissect_out="conceptmon_out_rewound")

    normalize = Normalizer(data.mean, data.std)
    schedule = Schedule.over(args.lr, args.epochs, train_dl, args.max_steps)

    def train_stage(first_epoch: int, masks, stage: int) -> dict | None:
        """Train epochs first_epoch..epochs of the cosine schedule; stage 0 returns the state at --rewind."""
        opt = sgd(model.parameters(), args)
        rewind_state = copy.deepcopy(model.state_dict()) if stage == 0 and args.rewind == 0 else None
        for done in train_epochs(model, train_dl, opt, normalize, device, schedule, range(first_epoch, args.epochs + 1),
                                 max_steps=args.max_steps, after_step=lambda: apply_masks(model, masks),
                                 progress=stderr_log):
            if stage == 0 and done.epoch == args.rewind:
                rewind_state = copy.deepcopy(model.state_dict())
            stderr_log(f"stage {stage} epoch {done.epoch}/{args.epochs}: train loss {done.loss:.3f} "
                       f"acc {100 * done.acc:.1f}% ({time.monotonic() - done.started:.1f} s)")
        return rewind_state

    masks = None
    start = time.monotonic()
    rewind_state = train_stage(1, masks, stage=0)
    for stage in range(args.stages + 1):
        if stage > 0:
            masks = global_magnitude_masks(model, args.prune_fraction, masks)
            model.load_state_dict(rewind_state)
            apply_masks(model, masks)
            start = time.monotonic()
        meta = dict(stage=stage, sparsity=sparsity(masks), rewind_epoch=args.rewind, seed=args.seed)
        if stage > 0:
            rewound.save(model, stage, **meta)
            train_stage(args.rewind + 1, masks, stage=stage)
        else:
            # Stage 0's initialisation is the dense network at the rewind epoch.
            current = copy.deepcopy(model.state_dict())
            model.load_state_dict(rewind_state)
            rewound.save(model, 0, **meta)
            model.load_state_dict(current)
        val_acc = evaluate(model, val_dl, normalize, device, max_steps=args.max_steps)
        trained.save(model, stage, val_acc=val_acc, **meta)
        trained.record(EpochRecord(stage, None, None, val_acc, time.monotonic() - start,
                                   extra={"sparsity": round(meta["sparsity"], 4)}), unit="stage")
    print(f"checkpoints: {trained.checkpoints} (stages) and {rewound.checkpoints} (rewound inits)\n"
          f"next: conceptmon dissect --config {config}")


if __name__ == "__main__":
    sys.exit(run_main(main))
