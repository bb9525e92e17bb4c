"""Training-step and inference time of LoD vs dense (and DLRT's KLS step), against their MAC ratio.

For each model and rank fraction p, the LoD model is ``factorize(model, rank=p)``
(every factorizable layer at ``⌈p·min(m, n)⌉``); a training step is forward +
backward + SGD-with-momentum step. Times are medians over ``--steps`` after
``--warmup`` steps. Writes JSON (``--out``) and prints a table.

    python benchmarks/lod_speed.py                      # CPU, ResNet-18 and the digits CNN
    python benchmarks/lod_speed.py --device cuda --batch 128
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maestro_fl.convert import factorize  # noqa: E402
from maestro_fl.dlrt import KLSIntegrator, dlrt_factorize  # noqa: E402
from maestro_fl.footprint import footprint  # noqa: E402
from maestro_fl.models import InputSpec, build_model  # noqa: E402

MODELS = {"resnet18": InputSpec.image(3, 32, 10), "cnn": InputSpec.image(1, 8, 10)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, train: bool) -> float:
    device = x.device
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train(train)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        if train:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_dlrt_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int) -> float:
    """One fixed-rank KLS step (K/L pass, QR, S pass) per iteration: the rank stays as built."""
    integrator = KLSIntegrator(model, lr=0.01, adaptive=False)
    times = []
    for i in range(warmup + steps):
        _sync(x.device)
        t0 = time.perf_counter()
        integrator.step(lambda: F.cross_entropy(model(x), y))
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,cnn")
    ap.add_argument("--fractions", default="1.0,0.5,0.25")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true", help="use the channels_last memory format")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/lod_speed-<device>.json)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name]
        torch.manual_seed(0)
        dense = build_model(name, spec)
        x = torch.randn(args.batch, *spec.shape, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, spec.num_classes, (args.batch,), device=device)
        dense_fp = footprint(dense, spec.shape)
        base = {
            t: time_steps(dense.to(device, memory_format=fmt), x, y, args.steps, args.warmup, t == "train")
            for t in ("train", "infer")
        }
        for p in (float(f) for f in args.fractions.split(",")):
            lod = factorize(copy.deepcopy(dense).cpu(), rank=p).to(device, memory_format=fmt)
            fp = footprint(lod, spec.shape, as_deployed=False)
            t_train = time_steps(lod, x, y, args.steps, args.warmup, True)
            t_infer = time_steps(lod, x, y, args.steps, args.warmup, False)
            # DLRT at the same ranks (every layer factorized, as LoD): max_rank large = ⌈p·min(m, n)⌉
            dlrt = dlrt_factorize(copy.deepcopy(dense).cpu(), p, keep_classifier=False, max_rank=10**9, min_rank=1)
            t_dlrt = time_dlrt_steps(dlrt.to(device, memory_format=fmt), x, y, args.steps, args.warmup)
            mac_reduction = dense_fp.macs / fp.macs
            row = {
                "model": name,
                "rank_fraction": p,
                "batch": args.batch,
                "lod_macs": fp.macs,
                "dense_macs": dense_fp.macs,
                "mac_ratio": fp.macs / dense_fp.macs,
                "mac_reduction": mac_reduction,
                "dense_train_s": base["train"],
                "lod_train_s": t_train,
                "train_speedup": base["train"] / t_train,
                "dlrt_train_s": t_dlrt,
                "dlrt_vs_lod": t_dlrt / t_train,
                "dense_infer_s": base["infer"],
                "lod_infer_s": t_infer,
                "infer_speedup": base["infer"] / t_infer,
                # the target: speedup >= 0.6 x MAC reduction where MACs <= 30% of dense
                "train_efficiency": (base["train"] / t_train) / mac_reduction,
                "target_applies": fp.macs <= 0.3 * dense_fp.macs,
            }
            row["target_met"] = bool(row["train_efficiency"] >= 0.6) if row["target_applies"] else None
            rows.append(row)
            print(
                f"{name:9s} p={p:<4} MACs x{mac_reduction:5.2f}  train {t_train * 1e3:8.1f} ms "
                f"(x{row['train_speedup']:.2f})  infer {t_infer * 1e3:8.1f} ms (x{row['infer_speedup']:.2f})  "
                f"dlrt train {t_dlrt * 1e3:8.1f} ms",
                flush=True,
            )
    out = Path(args.out or Path(__file__).parent / "results" / f"lod_speed-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "channels_last": args.channels_last,
        "steps": args.steps,
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
