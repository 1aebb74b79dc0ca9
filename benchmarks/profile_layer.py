"""Where the time of one MoM layer goes: torch.profiler over forward+backward, CUDA kernels ranked by total time.

    python benchmarks/profile_layer.py                     # the default shape: 8 x 2048, hidden 1024, 4 heads of 256
    python benchmarks/profile_layer.py --memories 1 --topk 1 --no-shared   # the single-memory layer
    python benchmarks/profile_layer.py --low-memory                       # MoM with low_memory=True

Prints the top kernels (name, calls, total ms per step) and writes them as JSON.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import atomic_write_json  # noqa: E402
from memmix.layers import MixtureOfMemories  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--memories", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--no-shared", action="store_true")
    p.add_argument("--low-memory", action="store_true", help="the layer with low_memory=True")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--json", default="benchmarks/results/profile_layer.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_layer.py: needs CUDA (the profile ranks GPU kernels)")
    torch.manual_seed(0)
    layer = MixtureOfMemories(hidden_size=args.hidden, num_heads=args.num_heads, head_dim=args.head_dim,
                              expand_v=1.0, num_memories=args.memories, topk=args.topk,
                              shared_mem=not args.no_shared, low_memory=args.low_memory).cuda().bfloat16()
    x = torch.randn(args.batch, args.seq_len, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        if args.forward_only:
            with torch.no_grad():
                layer(x)
        else:
            layer(x).hidden_states.float().square().mean().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if total > 0:
            rows.append({"kernel": ev.key[:90], "calls_per_step": ev.count / args.steps,
                         "ms_per_step": total / 1000 / args.steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total_ms = sum(r["ms_per_step"] for r in rows)
    print(f"{'kernel':<90} {'calls':>6} {'ms/step':>8}")
    for r in rows[: args.top]:
        print(f"{r['kernel']:<90} {r['calls_per_step']:6.1f} {r['ms_per_step']:8.3f}")
    print(f"sum of kernel time per step: {total_ms:.2f} ms ({len(rows)} kernel kinds)")
    atomic_write_json(args.json, {"device": torch.cuda.get_device_name(), "args": vars(args),
                                  "kernel_ms_per_step": total_ms, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
