#!/usr/bin/env python
"""Speed and memory targets, measured as ratios within one process; prints JSON.

    python scripts/bench.py [--only dissect,clip,embed,stats] [--images 1000] [--size 112]

Targets (from the issues) are reported next to each measurement, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_dissect(n_images: int, size: int, workdir: Path) -> dict:
    """ResNet-18, layers layer2-4, synthetic probe: dissect vs a bare forward pass."""
    import torchvision

    from conceptmon.config import config_from_dict
    from conceptmon.detectors import RunContext, create_detector
    from conceptmon.engine import collect_layers, make_loader
    from conceptmon.hooks import LayerTrace
    from conceptmon.models import resolve_device
    from conceptmon.probes import create_probe

    layers = ["layer2", "layer3", "layer4"]
    cfg = config_from_dict(
        {
            "layers": layers,
            "probe": {"name": "synthetic", "root": str(workdir / f"synthetic_{n_images}_{size}"), "n": n_images,
                      "image_size": size},
            "batch_size": 64,
        }
    )
    device = resolve_device(cfg.device)
    probe = create_probe(cfg.probe)
    model = torchvision.models.resnet18(num_classes=365).eval().to(device)
    ctx = RunContext(device=device, cache_dir=workdir / "cache")
    detector = create_detector(cfg, probe, ctx)
    t0 = time.perf_counter()
    detector.prepare()  # decodes masks once per probe set; every later checkpoint reuses the cache
    mask_cache_s = time.perf_counter() - t0
    loader = make_loader(probe, cfg, device)

    def bare_forward():
        with torch.no_grad(), LayerTrace(model, layers) as trace:  # same early stop as dissect
            for x, _ in loader:
                trace.run(x.to(device))

    bare_forward()  # warm-up (allocator, kernels, file cache)
    timings = {"bare": [], "dissect": []}
    kept_bytes = {}
    for _ in range(2):
        t0 = time.perf_counter()
        bare_forward()
        timings["bare"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        collect_layers(model, layers, loader, detector, device)
        timings["dissect"].append(time.perf_counter() - t0)
    bare, dissect = min(timings["bare"]), min(timings["dissect"])

    # Memory: the detector's kept state for growing probe sizes (should track the top values).
    for n in (n_images // 4, n_images // 2, n_images):
        sub = config_from_dict({**cfg.to_dict(), "probe": {**cfg.to_dict()["probe"], "limit": n}})
        sub_probe = create_probe(sub.probe)
        det = create_detector(sub, sub_probe, RunContext(device=device, cache_dir=workdir / "cache"))
        det.prepare()
        accs = {}
        with torch.no_grad(), LayerTrace(model, layers) as trace:
            for x, idx in make_loader(sub_probe, sub, device):
                for name, act in trace.run(x.to(device)).items():
                    accs.setdefault(name, det.accumulator(name, act.shape[1])).add(act, idx)
        kept_bytes[n] = {name: acc.state_bytes() for name, acc in accs.items()}
    return {
        "images": n_images,
        "image_size": size,
        "layers": layers,
        "device": str(device),
        "bare_forward_s": round(bare, 3),
        "dissect_s": round(dissect, 3),
        "ratio": round(dissect / bare, 3),
        "target_ratio": 1.5,
        "mask_cache_once_s": round(mask_cache_s, 3),
        "detector_state_bytes_by_images": kept_bytes,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


BENCHES = {"dissect": bench_dissect}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = {"torch_threads": torch.get_num_threads()}
    for name in args.only.split(","):
        print(f"bench: {name} ...", file=sys.stderr)
        results[name] = BENCHES[name](args.images, args.size, args.workdir)
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
