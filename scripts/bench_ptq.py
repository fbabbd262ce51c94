"""Cost of post-training quantization: building the quantized copy, and inference with it vs float.

    OMP_NUM_THREADS=1 python scripts/bench_ptq.py [--model lenet5|resnet20] [--batch 500] [--rounds 7]

Inference with PTQ weights is float inference on decoded values (same cost); activation quantization
adds one fake-quantize per conv/linear input. Rounds are interleaved so the machine's load hits all
variants alike; the median is reported. Also prints the weight memory (uint8 codes, bit-packed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qexp.methods.ptq.method import affine_weight_copy, quantize_activations, weight_memory
from qexp.models.lenet import LeNet5
from qexp.models.resnet import CifarResNet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet5", choices=["lenet5", "resnet20"])
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.model == "lenet5":
        model, shape = LeNet5(), (1, 28, 28)
    else:
        model, shape = CifarResNet(20), (3, 32, 32)
    model.eval()
    x = torch.randn(args.batch, *shape)
    calib = [(torch.randn(64, *shape), None) for _ in range(8)]

    t0 = time.perf_counter()
    wq, codes = affine_weight_copy(model, 8)
    t_copy = time.perf_counter() - t0
    aq, _ = affine_weight_copy(model, 8)
    t0 = time.perf_counter()
    quantize_activations(aq, 8, calib)
    t_calib = time.perf_counter() - t0

    variants = {"float": model, "ptq weights 8b": wq, "ptq weights + activations 8b": aq}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for m in variants.values():
            m(x)  # warm-up
        for _ in range(args.rounds):
            for name, m in variants.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["float"])
    print(f"{args.model}, batch {args.batch}, CPU threads {torch.get_num_threads()}, median of {args.rounds}")
    print("| variant | ms/batch | vs float |\n|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1000 * med:.1f} | {med / base:.2f} |")
    print(f"quantize weights (copy + encode): {1000 * t_copy:.1f} ms; calibrate 8 batches of 64: "
          f"{1000 * t_calib:.1f} ms")
    for k in (8, 4, 2):
        mem = weight_memory(model, k, codes if k == 8 else None)
        print(f"{k} bits: float32 {mem['float32_bytes']} B, uint8 codes {mem['weight_bytes']} B "
              f"({mem['float32_bytes'] / mem['weight_bytes']:.2f}x), packed {mem['packed_bytes']} B "
              f"({mem['float32_bytes'] / mem['packed_bytes']:.2f}x)")


if __name__ == "__main__":
    main()
