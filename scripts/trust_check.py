#!/usr/bin/env python
"""Does label confidence predict which labels survive a new probe set?

Dissects one epoch of a run again on an independent synthetic probe set (the same size,
another generator seed) and reports, for the neurons whose confidence in the run was at
least ``--level`` and for the rest, the share whose top-1 concept is the same on the new
probe set. JSON on stdout.

    python scripts/trust_check.py demo_out [--epoch 8] [--seed 1] [--level 0.9]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a run folder (e.g. the demo's)")
    parser.add_argument("--epoch", type=int, default=None, help="default: the last dissected epoch")
    parser.add_argument("--seed", type=int, default=1, help="seed of the independent probe set")
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--work", type=Path, default=None, help="where the new probe and tables go (default OUT_trust)")
    args = parser.parse_args()
    work = args.work or args.out.with_name(args.out.name + "_trust")

    from conceptmon import store
    from conceptmon.checkpoints import find_checkpoints
    from conceptmon.config import config_from_dict
    from conceptmon.engine import Dissector
    from conceptmon.probes.synthetic import generate_synthetic

    manifest = store.read_manifest(args.out)
    config = manifest["config"]
    epoch = args.epoch if args.epoch is not None else max(store.finished_epochs(args.out))
    probe = dict(config["probe"])
    n = manifest["probe"]["n_images"]
    size = probe.get("image_size") or 64
    other = work / f"probe_seed{args.seed}"
    if not (other / "index.csv").exists():
        generate_synthetic(other, n=n, size=size, seed=args.seed)
    cfg = config_from_dict({**config, "probe": {**probe, "root": str(other), "seed": args.seed},
                            "out": str(work / f"out_seed{args.seed}")})
    ckpt = next(c for c in find_checkpoints(Path(config["checkpoints"])) if c.epoch == epoch)
    dissector = Dissector(cfg, cfg.out, checkpoints=ckpt.path.parent, force=True, log=lambda m: None)
    dissector.dissect_files([ckpt])
    first = store.read_dissect(args.out, [epoch])
    again = store.read_dissect(Path(cfg.out), [epoch])
    key = ["layer", "neuron"]
    a = first[first["rank"] == 0].set_index(key)
    b = again[again["rank"] == 0].set_index(key)
    joined = a[["concept", "confidence", "interpretable", "dead"]].join(b[["concept"]].rename(columns={"concept": "concept_new"}))
    live = joined[~joined["dead"]]
    result = {"run": str(args.out), "epoch": epoch, "independent_probe_seed": args.seed, "images": n,
              "level": args.level, "groups": {}}
    for name, rows in (("all live neurons", live), ("interpretable neurons", live[live["interpretable"]])):
        confident = rows[rows["confidence"] >= args.level]
        rest = rows[rows["confidence"] < args.level]
        result["groups"][name] = {
            "confident": {"neurons": len(confident),
                          "same_top1": round(float((confident["concept"] == confident["concept_new"]).mean()), 3)
                          if len(confident) else None},
            "rest": {"neurons": len(rest),
                     "same_top1": round(float((rest["concept"] == rest["concept_new"]).mean()), 3)
                     if len(rest) else None},
        }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
