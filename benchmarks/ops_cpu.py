"""CPU timing of the memory-rule ops: chunkwise-parallel vs step-loop, forward and forward+backward.

    python benchmarks/ops_cpu.py [--lengths 512 2048] [--json benchmarks/results/ops_cpu.json]

Prints a table (medians after warm-up, milliseconds) and writes the rows as JSON (atomically).
"""
from __future__ import annotations

import argparse
import os
import platform

import torch
from common import cpu_median_ms, atomic_write_json

from memmix.ops import l2norm
from memmix.ops.registry import rules

RULES = {rule.name: rule for rule in rules()}
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ops_cpu.json")


def make_args(rule: str, B: int, T: int, H: int, K: int, V: int, requires_grad: bool) -> list[torch.Tensor]:
    """Positional inputs of `rule` in float32: q, k (unit norm), v[, g][, beta]."""
    args = [torch.randn(B, T, H, K), l2norm(torch.randn(B, T, H, K)), torch.randn(B, T, H, V)]
    if RULES[rule].uses_gate:
        args.append(torch.nn.functional.logsigmoid(torch.randn(B, T, H) + 3))
    if RULES[rule].uses_beta:
        args.append(torch.rand(B, T, H))
    return [x.requires_grad_(requires_grad) for x in args]


def time_rule(rule: str, impl: str, T: int, backward: bool, args: argparse.Namespace) -> float:
    """Median ms of one forward (or forward + backward) of `rule` with `impl`."""
    fn = RULES[rule].op
    inputs = make_args(rule, args.batch, T, args.heads, args.head_dim, args.head_dim, requires_grad=backward)

    def forward():
        with torch.no_grad():
            fn(*inputs, impl=impl, output_final_state=True)

    def forward_backward():
        o, state = fn(*inputs, impl=impl, output_final_state=True)
        (o.sum() + state.sum()).backward()

    return cpu_median_ms(forward_backward if backward else forward, args.warmup, args.repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64, help="K = V")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    passes = ["forward"] + ([] if args.no_backward else ["forward+backward"])
    rows = []
    header = f"{'rule':<24}{'pass':<18}{'T':>6}{'recurrent ms':>14}{'chunk ms':>11}{'ratio':>8}"
    print(f"B={args.batch} H={args.heads} K=V={args.head_dim} float32, torch threads={torch.get_num_threads()}")
    print(header + "\n" + "-" * len(header))
    for rule in args.rules:
        for pass_name in passes:
            for T in args.lengths:
                times = {impl: time_rule(rule, impl, T, pass_name != "forward", args)
                         for impl in ("recurrent", "chunk")}
                ratio = times["recurrent"] / times["chunk"]
                rows.append({"rule": rule, "pass": pass_name, "T": T, "recurrent_ms": times["recurrent"],
                             "chunk_ms": times["chunk"], "recurrent_over_chunk": ratio})
                print(f"{rule:<24}{pass_name:<18}{T:>6}{times['recurrent']:>14.2f}{times['chunk']:>11.2f}"
                      f"{ratio:>7.1f}x", flush=True)
    atomic_write_json(args.json, {
        "config": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": "float32",
                   "warmup": args.warmup, "repeats": args.repeats, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
                   "load_average_1m_at_end": os.getloadavg()[0]},
        "rows": rows,
    })
    print(f"wrote {args.json} (1-minute load average {os.getloadavg()[0]:.1f}: other processes skew timings)")


if __name__ == "__main__":
    main()
