#!/usr/bin/env python
"""Network Dissection at Broden scale: linear cost, bounded kept state, bootstrap overhead.

    python scripts/bench_netdissect.py [--only linear,memory,bootstrap] [--small]

Each function returns a JSON-friendly dict of numbers; scripts/bench.py can call them.
Targets from the issue are reported next to the measurements, never asserted. Timings are
ratios within one process: on a shared machine only the ratios mean something.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from conceptmon.entry import set_openmp_defaults

set_openmp_defaults()  # as the conceptmon command does: before torch loads

import torch
import torch.nn.functional as F


RESNET18_BRODEN_LAYERS = {"layer2": (128, 28, 28), "layer3": (256, 14, 14), "layer4": (512, 7, 7)}
"""ResNet-18 at 224 px: units, height, width of the layers dissected on Broden."""
BRODEN_IMAGES = 63_305


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    """CPU time of this process on the CPU (steadier than wall time on a shared machine),
    wall time after a synchronize on an accelerator (whose work the CPU clock misses)."""
    if device.type == "cpu":
        return time.process_time()
    _sync(device)
    return time.perf_counter()


def _device(name: str) -> torch.device:
    from conceptmon.models import resolve_device

    return resolve_device(name)


class WideNet(torch.nn.Module):
    """A cheap, wide CNN: at 112 px, ``a`` is 128 units at 28x28 and ``b`` 256 units at 14x14.

    Cheap on purpose, so that the detector's own cost is what the ratios show.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, stride=2, padding=1), torch.nn.ReLU())
        self.a = torch.nn.Sequential(torch.nn.Conv2d(32, 128, 3, stride=2, padding=1), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(128, 256, 3, stride=2, padding=1), torch.nn.ReLU())

    def forward(self, x):
        return self.b(self.a(self.stem(x)))


def _synthetic_probe(workdir: Path, n_images: int, image_size: int, limit: int | None = None):
    from conceptmon.config import ProbeConfig
    from conceptmon.probes import create_probe

    cfg = ProbeConfig(name="synthetic", root=str(workdir / f"synthetic_{n_images}_{image_size}"), n=n_images,
                      image_size=image_size,
                      limit=limit, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    return create_probe(cfg), cfg


def linear_cost(sizes=(2000, 8000), image_size: int = 112, batch_size: int = 64, workdir: Path | None = None,
                device: str = "auto", quantile: float = 0.005) -> dict:
    """Dissect time against a bare decode + forward pass of :class:`WideNet`, at each probe size.

    ``per_image_ratio``: in the largest run, the cost per image of the images after the
    first ``sizes[0]`` over the cost per image of the first ``sizes[0]`` (flat = 1.0), for
    dissect and (as the control) for the bare pass. The mask cache is built beforehand.
    """
    from conceptmon.config import config_from_dict
    from conceptmon.detectors import RunContext, create_detector
    from conceptmon.engine import collect_layers, make_loader, normalize
    from conceptmon.hooks import LayerTrace

    workdir = Path(workdir or tempfile.mkdtemp(prefix="bench-netdissect-"))
    dev = _device(device)
    sizes = sorted(sizes)
    layers = ["a", "b"]
    model = WideNet().eval().to(dev)
    out: dict = {"device": str(dev), "image_size": image_size, "quantile": quantile, "layers": {
        "a": "128 units at 28x28", "b": "256 units at 14x14"} if image_size == 112 else layers, "runs": {}}
    for n in [min(2 * batch_size, sizes[0])] + sizes:  # the first, tiny run only warms up
        probe, probe_cfg = _synthetic_probe(workdir, sizes[-1], image_size, limit=n)
        cfg = config_from_dict({"layers": layers, "batch_size": batch_size, "detector": {"quantile": quantile},
                                "probe": probe_cfg.to_dict(), "trust": {"replicates": 0}})
        messages: list[str] = []
        det = create_detector(cfg, probe, RunContext(device=dev, cache_dir=workdir / "cache", log=messages.append))
        det.prepare()
        loader = make_loader(probe, cfg, dev)
        marks: dict = {}

        def mark(done, total, marks=marks):
            _sync(dev)
            if done >= sizes[0] and "at_first" not in marks:
                marks["at_first"] = (done, time.perf_counter())
            if done == total:
                marks["last_batch"] = time.perf_counter()

        def bare(marks=marks):
            t0 = time.perf_counter()
            done = 0
            with torch.no_grad(), LayerTrace(model, layers) as trace:
                for x, _ in loader:
                    trace.run(normalize(x.to(dev), cfg.probe.mean, cfg.probe.std))
                    done += x.shape[0]
                    _sync(dev)
                    if done >= sizes[0] and "bare_at_first" not in marks:
                        marks["bare_at_first"] = (done, time.perf_counter())
            return t0, time.perf_counter()

        if "warmed_up" not in out:  # load (on a first run: compile) the fused CPU kernels
            collect_layers(model, layers, loader, det, dev, mean=cfg.probe.mean, std=cfg.probe.std)
            out["warmed_up"] = f"one dissect of {n} images before the timed runs"
            continue
        bare()  # warm-up: file cache, allocator, kernels
        # Bare passes right before and right after dissect, and the faster of them: this
        # machine's speed drifts by tens of percent over minutes, and the ratio should err
        # on the side of the detector looking slower.
        runs = []
        marks.clear()
        runs.append((bare(), dict(marks)))
        messages.clear()
        t0 = time.perf_counter()
        collect_layers(model, layers, loader, det, dev, mean=cfg.probe.mean, std=cfg.probe.std, progress=mark)
        t1 = time.perf_counter()
        dissect_marks = {k: marks[k] for k in ("at_first", "last_batch")}
        marks.clear()
        runs.append((bare(), dict(marks)))
        (b0, b1), bare_marks = min(runs, key=lambda r: r[0][1] - r[0][0])
        marks.clear()
        marks.update(bare_marks, **dissect_marks)
        run = {"bare_s": round(b1 - b0, 3), "dissect_s": round(t1 - t0, 3), "ratio": round((t1 - t0) / (b1 - b0), 3),
               "scores_s": round(t1 - marks["last_batch"], 3),
               "second_passes": sum("second pass" in m for m in messages)}
        if n > sizes[0]:
            first_n, first_t = marks["at_first"]
            later = (marks["last_batch"] - first_t) / (n - first_n)
            run["per_image_ratio_dissect"] = round(later / ((first_t - t0) / first_n), 3)
            bare_n, bare_t = marks["bare_at_first"]
            run["per_image_ratio_bare"] = round(((b1 - bare_t) / (n - bare_n)) / ((bare_t - b0) / bare_n), 3)
        out["runs"][str(n)] = run
    out["target_ratio_at_largest"] = 1.5
    out["target_per_image_ratio"] = 1.1
    return out


# ----------------------------------------------------------------------------- kept state at Broden scale


class _SizedProbe:
    """Stands in for a probe set of ``n`` images when only the streaming part runs (no masks)."""

    name = "sized"
    has_masks = True

    def __init__(self, n: int):
        from conceptmon.concepts import ConceptSet

        self.n = n
        self.concepts = ConceptSet(("none",), ("color",))
        self.category_names = ("color",)
        self.mask_size = (1, 1)
        self.root = Path(".")

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        return f"sized-{self.n}"


def synthetic_activations(batch: int, shape: tuple[int, int, int], generator: torch.Generator,
                          device: torch.device) -> torch.Tensor:
    """ReLU feature maps with a realistic structure: spatially smooth (3x3-blurred Gaussian
    noise), a per-(image, unit) log-normal gain (a unit fires strongly on some images),
    about 15 % of the values positive."""
    u, h, w = shape
    noise = torch.randn(batch, u, h + 2, w + 2, generator=generator).to(device)
    smooth = F.avg_pool2d(noise, 3, stride=1) * 3.0  # back to unit variance
    gain = torch.exp(0.5 * torch.randn(batch, u, 1, 1, generator=generator)).to(device)
    return torch.relu(smooth * gain - 1.0)


def broden_memory(n_images: int = BRODEN_IMAGES, layers: dict | None = None, batch_size: int = 64,
                  quantile: float = 0.005, device: str = "auto", seed: int = 0, report_every: int = 1000) -> dict:
    """Kept state of the accumulators for ResNet-18 layers 2-4 over an ``n_images`` probe set.

    Feeds :func:`synthetic_activations` of the layers' shapes batch by batch, without the
    IoU scoring step (no masks). Per layer: K, the peak bytes of the top-K values, pending
    values and sparse candidates over the run, and the accumulator's seconds per 1,000
    images in each ``report_every`` window (the activations' generation is not timed; CPU
    seconds of the process on the CPU, wall seconds on an accelerator, see :func:`_clock`).
    """
    from conceptmon.config import config_from_dict
    from conceptmon.detectors import RunContext, create_detector

    layers = layers or RESNET18_BRODEN_LAYERS
    dev = _device(device)
    cfg = config_from_dict({"layers": list(layers), "detector": {"quantile": quantile}, "trust": {"replicates": 0}})
    det = create_detector(cfg, _SizedProbe(n_images), RunContext(device=dev, cache_dir=Path(tempfile.gettempdir())))
    accs = {name: det.accumulator(name, shape[0]) for name, shape in layers.items()}
    generator = torch.Generator().manual_seed(seed)
    seconds = {name: 0.0 for name in layers}
    windows: dict = {name: [] for name in layers}
    window_start = {name: 0.0 for name in layers}
    done = 0
    while done < n_images:
        b = min(batch_size, n_images - done)
        index = torch.arange(done, done + b)
        for name, shape in layers.items():
            acts = synthetic_activations(b, shape, generator, dev)
            t0 = _clock(dev)
            accs[name].add(acts, index)
            seconds[name] += _clock(dev) - t0
        before, done = done, done + b
        if done // report_every != before // report_every or done == n_images:
            for name in layers:
                windows[name].append({"images": done, "s_per_1k_images": round(
                    1000 * (seconds[name] - window_start[name]) / (done - (windows[name][-1]["images"] if windows[name]
                                                                           else 0)), 4)})
                window_start[name] = seconds[name]
    out: dict = {"device": str(dev), "images": n_images, "batch_size": batch_size, "quantile": quantile, "layers": {}}
    total_peak = 0
    for name, acc in accs.items():
        state = acc.state_bytes()
        second_pass_units = int(acc.retry_units.numel()) if acc.needs_another_pass() else 0
        peak = {k: state[f"peak_{k}"] for k in ("top_values", "pending", "candidates")}
        total_peak += sum(peak.values())
        per_1k = [w["s_per_1k_images"] for w in windows[name]]
        out["layers"][name] = {
            "shape": list(layers[name]), "k": state["k"],
            **{f"peak_{k}_mb": round(v / 2**20, 2) for k, v in peak.items()},
            "final_mb": round(state["total"] / 2**20, 2),
            "candidate_values": state["candidate_values"], "merged_values": state["merged_values"],
            "values_seen": n_images * layers[name][1] * layers[name][2] * layers[name][0],
            "s_per_1k_images": per_1k,
            "s_per_1k_last_over_first_windows": round(per_1k[-1] / per_1k[0], 3) if len(per_1k) > 1 and per_1k[0] else None,
            "accumulate_s": round(seconds[name], 3),
            "units_needing_a_second_pass": second_pass_units,
        }
    out["peak_total_mb_upper_bound"] = round(total_peak / 2**20, 1)  # peaks of parts need not coincide
    return out


# ----------------------------------------------------------------------------- bootstrap overhead


def bootstrap_cost(n_images: int = 1000, image_size: int = 112, replicates: int = 50, batch_size: int = 64,
                   workdir: Path | None = None, device: str = "auto") -> dict:
    """Extra time of ``scores()`` with B replicates over B = 0, ResNet-18 layers 2-4 on the
    synthetic probe, against the dissect pass (forward + streaming + scoring with B = 0)."""
    import torchvision

    from conceptmon.config import config_from_dict
    from conceptmon.detectors import RunContext, TrustSettings, create_detector
    from conceptmon.engine import make_loader, normalize
    from conceptmon.hooks import LayerTrace

    workdir = Path(workdir or tempfile.mkdtemp(prefix="bench-netdissect-"))
    dev = _device(device)
    layers = ["layer2", "layer3", "layer4"]
    probe, probe_cfg = _synthetic_probe(workdir, n_images, image_size)
    cfg = config_from_dict({"layers": layers, "batch_size": batch_size, "probe": probe_cfg.to_dict()})
    ctx = RunContext(device=dev, cache_dir=workdir / "cache")
    det = create_detector(cfg, probe, ctx)
    det.prepare()
    model = torchvision.models.resnet18(num_classes=365).eval().to(dev)
    loader = make_loader(probe, cfg, dev)

    def forward(accs=None):
        with torch.no_grad(), LayerTrace(model, layers) as trace:
            for x, index in loader:
                outputs = trace.run(normalize(x.to(dev), cfg.probe.mean, cfg.probe.std))
                if accs is not None:
                    for name, act in outputs.items():
                        accs.setdefault(name, det.accumulator(name, act.shape[1])).add(act.float(), index)
        _sync(dev)

    forward()  # warm-up
    t0 = time.perf_counter()
    forward()
    bare = time.perf_counter() - t0
    accs: dict = {}
    t0 = time.perf_counter()
    forward(accs)
    stream = time.perf_counter() - t0

    def score(b: int) -> float:
        ctx.trust = TrustSettings(replicates=b, seed=0)
        t0 = time.perf_counter()
        for acc in accs.values():
            acc.scores()
        _sync(dev)
        return time.perf_counter() - t0

    score(0)  # the first call also does the final prune
    timings = {0: [], replicates: []}
    for _ in range(2):  # interleaved, best of 2
        for b in timings:
            timings[b].append(score(b))
    plain, boot = min(timings[0]), min(timings[replicates])
    dissect = stream + plain
    return {
        "device": str(dev), "images": n_images, "image_size": image_size, "replicates": replicates,
        "bare_forward_s": round(bare, 3), "dissect_s": round(dissect, 3), "scores_s_b0": round(plain, 3),
        f"scores_s_b{replicates}": round(boot, 3), "extra_s": round(boot - plain, 3),
        "extra_over_dissect": round((boot - plain) / dissect, 3),
        "extra_over_bare_forward": round((boot - plain) / bare, 3),
        "target_extra": 0.15,
    }




def checkpoints_per_pass(n_checkpoints: int = 8, n_images: int = 2000, image_size: int = 112,
                         batch_size: int = 64, workdir: Path | None = None, device: str = "auto") -> dict:
    """A whole ``dissect`` run over ``n_checkpoints`` WideNet checkpoints (one pass over the
    probe feeds them all) against one bare pass that decodes every image once and runs all
    the models (target <= 2x). The mask cache is built beforehand, as after a first run."""
    from conceptmon.config import config_from_dict
    from conceptmon.engine import dissect_run, make_loader, normalize
    from conceptmon.hooks import LayerTrace

    workdir = Path(workdir or tempfile.mkdtemp(prefix="bench-netdissect-"))
    dev = _device(device)
    probe, probe_cfg = _synthetic_probe(workdir, n_images, image_size)
    ckpts = workdir / f"widenet_ckpts_{n_checkpoints}"
    ckpts.mkdir(parents=True, exist_ok=True)
    models = []
    for e in range(n_checkpoints):
        model = WideNet(seed=e).eval().to(dev)
        torch.save({"epoch": e, "state_dict": model.state_dict()}, ckpts / f"epoch_{e:04d}.pt")
        models.append(model)
    cfg = config_from_dict({"model": {"arch": "bench_netdissect:WideNet"}, "layers": ["a", "b"],
                            "batch_size": batch_size, "probe": probe_cfg.to_dict(), "trust": {"replicates": 0},
                            "cache_dir": str(workdir / "cache"), "device": str(dev)})
    out = workdir / "per_pass_out"
    shutil.rmtree(out, ignore_errors=True)  # a folder from an older version would be refused
    dissect_run(cfg, ckpts=ckpts, out=out, epochs=[0], force=True, log=lambda m: None)  # mask cache, warm-up
    loader = make_loader(probe, cfg, dev)

    def bare() -> float:
        t0 = time.perf_counter()
        traces = [LayerTrace(m, ["a", "b"]).__enter__() for m in models]
        with torch.no_grad():
            for x, _ in loader:
                x = normalize(x.to(dev), cfg.probe.mean, cfg.probe.std)
                for trace in traces:
                    trace.run(x)
                _sync(dev)
        for trace in traces:
            trace.close()
        return time.perf_counter() - t0

    bare()  # warm-up
    before = bare()
    messages: list[str] = []
    t0 = time.perf_counter()
    dissect_run(cfg, ckpts=ckpts, out=out, force=True, log=messages.append)
    _sync(dev)
    run_s = time.perf_counter() - t0
    bare_s = min(before, bare())  # the faster of the passes around it, as in linear_cost
    return {"device": str(dev), "checkpoints": n_checkpoints, "images": n_images, "image_size": image_size,
            "bare_pass_all_models_s": round(bare_s, 3), "dissect_run_s": round(run_s, 3),
            "ratio": round(run_s / bare_s, 3), "target_ratio": 2.0,
            "second_passes": sum("second pass" in m for m in messages)}


BENCHES = {"linear": linear_cost, "memory": broden_memory, "bootstrap": bootstrap_cost,
           "per_pass": checkpoints_per_pass}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    parser.add_argument("--small", action="store_true", help="small sizes, to check that everything runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    small = args.small
    calls = {
        "linear": lambda: linear_cost((200, 800) if small else (2000, 8000), workdir=args.workdir, device=args.device),
        "memory": lambda: {str(n): broden_memory(n, device=args.device, report_every=max(n // 4, 64))
                           for n in ((500, 2000) if small else (2000, 8000, 16000, BRODEN_IMAGES))},
        "bootstrap": lambda: bootstrap_cost(200 if small else 1000, workdir=args.workdir, device=args.device),
        "per_pass": lambda: checkpoints_per_pass(8, 200 if small else 2000, workdir=args.workdir, device=args.device),
    }
    results = {"torch_threads": torch.get_num_threads()}
    for name in args.only.split(","):
        print(f"bench_netdissect: {name} ...", file=sys.stderr)
        results[name] = calls[name]()
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
