#!/usr/bin/env python
"""How CLIP-Dissect's two interpretability rules behave, measured on the synthetic probe.

No CLIP weights are on this machine, so C comes from an *oracle*: C[i, m] = 0.2 +
0.08 * (share of image i that concept m covers) + Gaussian noise (sd 0.01) -- what a
well-behaved CLIP's image-text cosines look like for a concept that is or is not in an
image. Units are the planted units of ``conceptmon.planted`` (colours, striped, beach:
each should be interpretable; dead and noise should not) and the layer3/layer4 channels
of a randomly initialised ResNet-18 (they respond to colour and texture statistics but
were trained on nothing: a rule that calls many of them interpretable is too lenient).
For each similarity and rule it prints the share of planted units flagged interpretable
and the share of random-network units flagged, as JSON.

    python scripts/calibrate_clip.py [--images 1000] [--size 64]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torchvision


def coverage_matrix(probe) -> torch.Tensor:
    m = len(probe.concepts)
    cover = np.zeros((len(probe), m), dtype=np.float32)
    for i in range(len(probe)):
        a = probe.load_annotation(i)
        for maps in a.pixel_maps:
            counts = np.bincount(maps.reshape(-1), minlength=m + 1)[1:]
            cover[i] = np.maximum(cover[i], counts / maps.size)
        cover[i, np.asarray(a.image_labels, dtype=np.int64)] = 1.0
    return torch.from_numpy(cover)


def pooled(model_fn, probe, batch=100) -> torch.Tensor:
    out = []
    for start in range(0, len(probe), batch):
        x = torch.stack([torch.from_numpy(np.asarray(probe.load_image(i), dtype=np.float32) / 255).permute(2, 0, 1)
                         for i in range(start, min(start + batch, len(probe)))])
        with torch.no_grad():
            out.append(model_fn(x))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/calibrate"))
    args = parser.parse_args()

    from conceptmon import similarity
    from conceptmon.detectors.clipdissect import null_threshold
    from conceptmon.planted import PlantedUnits
    from conceptmon.probes.synthetic import SyntheticProbe, generate_synthetic

    root = args.workdir / f"probe_{args.images}_{args.size}"
    if not (root / "index.csv").exists():
        generate_synthetic(root, n=args.images, size=args.size, seed=0)
    probe = SyntheticProbe(root)
    g = torch.Generator().manual_seed(0)
    clip_sim = 0.2 + 0.08 * coverage_matrix(probe) + 0.01 * torch.randn(len(probe), len(probe.concepts), generator=g)

    units = PlantedUnits(("black", "white", "red"))
    planted = pooled(lambda x: units(x).mean(dim=(2, 3)), probe)
    expected = [c is not None for _, c in units.planted_expectations()]
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def random_units(x):
        x = (x - mean) / std
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        a3 = resnet.layer3(resnet.layer2(resnet.layer1(x)))
        return torch.cat([a3.mean(dim=(2, 3)), resnet.layer4(a3).mean(dim=(2, 3))], 1)

    random = pooled(random_units, probe)
    results = {"images": len(probe), "size": args.size, "concepts": len(probe.concepts), "rules": {}}
    for name in ("soft_wpmi", "wpmi", "cos_similarity_cubed"):
        sim = similarity.SIMILARITIES[name]
        fixed = similarity.default_threshold(name, len(probe.concepts), {})
        for label, acts, flags in (("planted", planted, expected), ("random", random, None)):
            best = sim(clip_sim, acts).max(dim=1).values
            cut = null_threshold(sim, clip_sim, acts, {}, permutations=4, quantile=0.99, seed=0)
            for rule, interpretable in (("threshold", best >= fixed), ("calibrated", best > cut)):
                key = f"{name}/{rule}"
                entry = results["rules"].setdefault(key, {})
                if flags is None:
                    entry["random_units_flagged"] = round(float(interpretable.float().mean()), 3)
                else:
                    want = torch.tensor(flags)
                    entry["planted_found"] = f"{int((interpretable & want).sum())}/{int(want.sum())}"
                    entry["planted_false"] = f"{int((interpretable & ~want).sum())}/{int((~want).sum())}"
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
