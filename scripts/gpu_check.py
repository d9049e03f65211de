#!/usr/bin/env python
"""The GPU path, checked on a machine with a CUDA device (under five minutes on one GPU).

1. One random ResNet-18 checkpoint, dissected (layers 2-4, Network Dissection, bootstrap
   on) over the same synthetic probe on ``cuda`` and on ``cpu``: the labels must be
   identical and every IoU within 1e-4.
2. The same on ``cuda`` with ``--amp`` (bf16 autocast): ties at the threshold are handled,
   so no unit loses its concept to a tie; reports how many top-1 labels agree with fp32.
3. Images per second of a bare decode + forward pass and of the whole dissection on cuda,
   and the same for 8 checkpoints sharing one pass over the probe.

Prints one JSON object; exit status 1 when check 1 fails or no CUDA device is present.
    python scripts/gpu_check.py [--images 2000] [--size 112] [--workdir /tmp/conceptmon-gpu]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def dissect(cfg_dict: dict, ckpts: Path, out: Path, **kw) -> float:
    from conceptmon.config import config_from_dict
    from conceptmon.engine import dissect_run

    start = time.perf_counter()
    dissect_run(config_from_dict(cfg_dict), ckpts=ckpts, out=out, force=True, log=lambda m: None, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bare_pass(cfg_dict: dict, n_models: int, device: torch.device) -> float:
    """Decode + normalise + forward every probe image through ``n_models`` ResNet-18s, no detector."""
    import torchvision

    from conceptmon.config import config_from_dict
    from conceptmon.engine import make_loader, normalize
    from conceptmon.hooks import LayerTrace
    from conceptmon.probes import create_probe

    cfg = config_from_dict(cfg_dict)
    probe = create_probe(cfg.probe)
    models = [torchvision.models.resnet18(weights=None).eval().to(device) for _ in range(n_models)]
    start = time.perf_counter()
    with torch.no_grad():
        traces = [LayerTrace(m, ["layer2", "layer3", "layer4"]).__enter__() for m in models]
        for x, _ in make_loader(probe, cfg, device):
            x = normalize(x.to(device, non_blocking=True), cfg.probe.mean, cfg.probe.std)
            for trace in traces:
                trace.run(x)
        for trace in traces:
            trace.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(a: Path, b: Path) -> dict:
    from conceptmon import store

    x, y = store.read_dissect(a), store.read_dissect(b)
    top_x, top_y = x[x["rank"] == 0].reset_index(drop=True), y[y["rank"] == 0].reset_index(drop=True)
    same_labels = bool((x["concept"].fillna("") == y["concept"].fillna("")).all())
    return {"identical_labels": same_labels,
            "max_iou_difference": float(np.abs(x["score"].to_numpy() - y["score"].to_numpy()).max()),
            "top1_agreement": float((top_x["concept"].fillna("") == top_y["concept"].fillna("")).mean()),
            "dead_units": int(top_y["dead"].sum()),
            "zero_score_live_units": int(((top_y["score"] == 0) & ~top_y["dead"]).sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/conceptmon-gpu"))
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu only runs the script's logic")
    args = parser.parse_args()
    gpu = args.device
    if gpu.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device on this machine"}))
        return 1
    import torchvision

    from conceptmon.probes.synthetic import generate_synthetic

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    probe = generate_synthetic(work / "probe", n=args.images, size=args.size, seed=0) \
        if not (work / "probe" / "index.csv").exists() else work / "probe"
    ckpts = work / "ckpts"
    ckpts.mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.save({"epoch": 0, "state_dict": torchvision.models.resnet18(weights=None).state_dict()},
               ckpts / "epoch_0000.pt")
    cfg = {"model": {"arch": "resnet18"}, "layers": ["layer2", "layer3", "layer4"],
           "probe": {"name": "synthetic", "root": str(probe)}, "batch_size": 128, "num_workers": 8,
           "trust": {"replicates": 50}, "cache_dir": str(work / "cache")}
    result = {"device": torch.cuda.get_device_name(0) if gpu.startswith("cuda") else gpu, "images": args.images,
              "size": args.size, "torch": torch.__version__}
    dissect({**cfg, "device": gpu}, ckpts, work / "warmup", epochs=[0])  # mask cache, CUDA context
    seconds_cuda = dissect({**cfg, "device": gpu}, ckpts, work / "gpu")
    seconds_cpu = dissect({**cfg, "device": "cpu", "num_workers": 4}, ckpts, work / "cpu")
    seconds_amp = dissect({**cfg, "device": gpu, "amp": True}, ckpts, work / "amp")
    result["cuda_vs_cpu"] = compare(work / "cpu", work / "gpu")
    result["amp_vs_fp32"] = compare(work / "gpu", work / "amp")
    bare = bare_pass({**cfg, "device": gpu}, 1, torch.device(gpu))
    result["images_per_second"] = {"bare_pass": round(args.images / bare, 1),
                                   "dissect_cuda": round(args.images / seconds_cuda, 1),
                                   "dissect_cpu": round(args.images / seconds_cpu, 1),
                                   "dissect_cuda_amp": round(args.images / seconds_amp, 1)}
    result["dissect_vs_bare"] = round(seconds_cuda / bare, 2)
    for e in range(1, 8):  # eight checkpoints over one pass
        torch.save({"epoch": e, "state_dict": torchvision.models.resnet18(weights=None).state_dict()},
                   ckpts / f"epoch_{e:04d}.pt")
    eight = dissect({**cfg, "device": gpu}, ckpts, work / "eight", checkpoints_per_pass=8)
    bare8 = bare_pass({**cfg, "device": gpu}, 8, torch.device(gpu))
    result["eight_checkpoints"] = {"seconds": round(eight, 1), "bare_pass_8_models": round(bare8, 1),
                                   "ratio": round(eight / bare8, 2)}
    ok = result["cuda_vs_cpu"]["identical_labels"] and result["cuda_vs_cpu"]["max_iou_difference"] <= 1e-4
    result["passed"] = bool(ok and result["amp_vs_fp32"]["zero_score_live_units"] == 0)
    print(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
