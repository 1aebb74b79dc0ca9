"""Speed and peak memory of one token-mixing layer: our MoM and our single-memory layer (each also with
low_memory=True), our B'MOJO, our B'MOJO-F against SDPA sliding-window attention of its span (2 --window),
flash-linear-attention's MomAttention and GatedDeltaNet (when importable), and softmax attention (PyTorch SDPA).

    python benchmarks/layer_speed.py                      # the default shape on CUDA, T = 2048, 8192, 32768
    python benchmarks/layer_speed.py --device cpu --tokens 2048 --seq-lens 256 --hidden 128 --head-dim 32
    python benchmarks/layer_speed.py --only MoM,single --phases  # + peak memory of each phase (CUDA)
    python benchmarks/layer_speed.py --only "B'MOJO-F,sliding" --window 512  # B'MOJO-F vs its SDPA baseline

SDPA has no sliding-window kernel: the sliding-window row is memmix's CausalSelfAttention with window 2w, which
passes SDPA a dense (T, T) mask, so its time and memory grow as T^2 while B'MOJO-F's grow as T (w + block).

Every row processes --tokens tokens (batch = tokens // T), or one sequence of T when T is longer; the
closing lines compare forward+backward time per token across T. Timings are medians of
triton.testing.do_bench on CUDA (warm-up included) or of perf_counter repeats on the CPU; forward+backward is
the forward and a backward from a fixed random output gradient.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import atomic_write_json, cpu_median_ms, device_name, only_matching  # noqa: E402
from memmix.layers import BMojo, BMojoF, MixtureOfMemories  # noqa: E402
from memmix.layers.attention import CausalSelfAttention  # noqa: E402


class SDPAttention(nn.Module):
    """Causal softmax attention baseline: qkv projection, SDPA, output projection."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))


def build_layers(args) -> tuple[dict, list[str]]:
    """name -> callable(x) returning the layer output tensor; plus notes printed under the table."""
    H, K, w = args.num_heads, args.head_dim, args.window
    notes = []
    common = dict(hidden_size=args.hidden, num_heads=H, head_dim=K, expand_v=1.0, impl=args.impl)
    ours = MixtureOfMemories(num_memories=4, topk=2, shared_mem=True, **common)
    single = MixtureOfMemories(num_memories=1, topk=1, shared_mem=False, **common)
    ours_low = MixtureOfMemories(num_memories=4, topk=2, shared_mem=True, low_memory=True, **common)
    single_low = MixtureOfMemories(num_memories=1, topk=1, shared_mem=False, low_memory=True, **common)
    layers = {
        "memmix MoM (4 mem, top-2, shared)": (ours, lambda m, x: m(x).hidden_states),
        "memmix single memory (GDN)": (single, lambda m, x: m(x).hidden_states),
        "memmix MoM low_memory": (ours_low, lambda m, x: m(x).hidden_states),
        "memmix single memory low_memory": (single_low, lambda m, x: m(x).hidden_states),
        "SDPA attention": (SDPAttention(args.hidden, H), lambda m, x: m(x)),
        "memmix B'MOJO (window 512, store 256)": (
            BMojo(args.hidden, num_heads=H, head_dim=K, window_size=512, chunk_size=64, eidetic_size=256,
                  eidetic_per_chunk=4, impl=args.impl),
            lambda m, x: m(x).hidden_states,
        ),
        f"memmix B'MOJO-F (window {w})": (
            BMojoF(args.hidden, num_heads=H, head_dim=K, window_size=w, impl=args.impl),
            lambda m, x: m(x).hidden_states,
        ),
        f"SDPA sliding window {2 * w}": (
            CausalSelfAttention(args.hidden, H, head_dim=K, window_size=2 * w),
            lambda m, x: m(x).hidden_states,
        ),
    }
    if args.device == "cuda" and not args.no_fla:
        try:
            from fla.layers import GatedDeltaNet, MomAttention

            _allow_fla_backward_on_old_triton(notes)
            fla_mom = MomAttention(hidden_size=args.hidden, head_dim=K, num_heads=H, expand_v=1, num_memories=4,
                                   topk=2, shared_mem=True)
            fla_gdn = GatedDeltaNet(hidden_size=args.hidden, head_dim=K, num_heads=H, expand_v=1)
            layers["fla MomAttention"] = (fla_mom, lambda m, x: m(x)[0])
            layers["fla GatedDeltaNet"] = (fla_gdn, lambda m, x: m(x)[0])
        except ImportError as err:
            notes.append(f"flash-linear-attention not importable ({err}); its rows are skipped")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return {name: (m.to(args.device, dtype), f) for name, (m, f) in layers.items()}, notes


def _allow_fla_backward_on_old_triton(notes: list[str]) -> None:
    """fla refuses its gated backward on Triton < 3.7.1 (wrong results there, fla issue #640). For TIMING only."""
    try:
        import fla.ops.common.chunk_o as chunk_o
    except ImportError:
        return
    if hasattr(chunk_o, "TRITON_ABOVE_3_7_1") and not chunk_o.TRITON_ABOVE_3_7_1:
        chunk_o.TRITON_ABOVE_3_7_1 = True
        notes.append("fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 forced True so fla's backward runs on this "
                     "Triton: its backward TIMES are shown, its results are not trusted")


def median_ms(fn, device: str, repeats: int) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(repeats * 10, 100), return_mode="median"))
    return cpu_median_ms(fn, warmup=1, repeats=repeats)


class PhasePeaks:
    """Peak CUDA memory (MiB above the memory held before the step) of each phase of one forward+backward: the
    forward and backward of the recurrence's and the segment convolution's autograd Functions (Triton path), and
    the rest of the forward ("forward_other") and of the backward ("backward_other")."""

    FUNCTIONS = (("memmix.ops.triton.gated_delta_rule", "ChunkGatedDeltaRuleFunction", "recurrence"),
                 ("memmix.ops.triton.mom_segment_kernels", "SegmentConvFunction", "conv"))

    def __init__(self):
        self.name, self.base, self.peaks = "forward_other", 0, {}

    def mark(self, name: str) -> None:
        """End the current phase (keep its peak) and start `name`."""
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        self.peaks[self.name] = max(self.peaks.get(self.name, 0.0), peak)
        torch.cuda.reset_peak_memory_stats()
        self.name = name

    def run(self, step) -> dict:
        """Phase -> peak MiB of step() (a forward+backward that marks "backward_other" between the two)."""
        import importlib

        saved = []
        for module_name, cls_name, phase in self.FUNCTIONS:
            cls = getattr(importlib.import_module(module_name), cls_name)
            for method in ("forward", "backward"):
                original = cls.__dict__[method]
                saved.append((cls, method, original))
                setattr(cls, method, staticmethod(self._wrapped(original.__func__, f"{phase}_{method}")))
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.name, self.base, self.peaks = "forward_other", torch.cuda.memory_allocated(), {}
            step(self)
            self.mark("done")
        finally:
            for cls, method, original in saved:
                setattr(cls, method, original)
        return {name: round(peak, 1) for name, peak in self.peaks.items()}

    def _wrapped(self, fn, name: str):
        def phase(ctx, *args):
            outer = self.name
            self.mark(name)
            try:
                return fn(ctx, *args)
            finally:
                self.mark(outer)
        return phase


def measure(module, call, x: torch.Tensor, device: str, repeats: int, phases: bool = False) -> dict:
    module.train()

    def forward():
        with torch.no_grad():
            call(module, x)

    upstream = torch.randn_like(x)  # a fixed output gradient: the time is the layer's, not a loss's

    def forward_backward():
        x.grad = None
        call(module, x).backward(upstream)

    fwd = median_ms(forward, device, repeats)
    fwd_bwd = median_ms(forward_backward, device, repeats)
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    result = {"forward_ms": fwd, "forward_backward_ms": fwd_bwd, "peak_train_mib": peak}
    if phases and device == "cuda":
        def step(tracker):
            x.grad = None
            y = call(module, x)
            tracker.mark("backward_other")
            y.backward(upstream)

        result["phase_peaks_mib"] = PhasePeaks().run(step)
    module.zero_grad(set_to_none=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (batch = tokens // T)")
    p.add_argument("--seq-lens", default="2048,8192,32768")
    p.add_argument("--impl", default="auto", choices=["auto", "chunk", "triton", "recurrent"])
    p.add_argument("--window", type=int, default=512,
                   help="B'MOJO-F's window w (its span, and the sliding-window baseline's window, is 2w)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention even when importable")
    p.add_argument("--only", default="", help="comma list of substrings: run only matching layers")
    p.add_argument("--phases", action="store_true",
                   help="CUDA: also the peak memory of each phase of one forward+backward (see PhasePeaks)")
    p.add_argument("--json", default="benchmarks/results/layer_speed.json")
    args = p.parse_args(argv)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    torch.manual_seed(0)
    layers, notes = build_layers(args)
    layers = only_matching(layers, args.only)
    gpu_or_cpu = device_name(args.device)
    rows = []
    for T in seq_lens:
        B = max(args.tokens // T, 1)
        dtype = next(iter(layers.values()))[0].q_proj.weight.dtype if layers else torch.float32
        x = torch.randn(B, T, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
        for name, (module, call) in layers.items():
            try:
                result = measure(module, call, x, args.device, args.repeats, args.phases)
            except torch.cuda.OutOfMemoryError:
                result = {"error": "out of memory"}
                torch.cuda.empty_cache()
            except Exception as err:  # a baseline failing must not hide the others' numbers
                result = {"error": f"{type(err).__name__}: {err}"[:200]}
            rows.append({"layer": name, "batch": B, "seq_len": T, "tokens": B * T, **result})
            _print_row(rows[-1])
            # rewritten after every row: a run stopped at a time limit keeps what it measured
            atomic_write_json(args.json, {"device": gpu_or_cpu, "torch": torch.__version__, "args": vars(args),
                                          "notes": notes, "rows": rows, "scaling": scaling(rows)})
    for layer, ratios in scaling(rows).items():
        print(f"per-token fwd+bwd time vs T={seq_lens[0]}, {layer}: "
              + ", ".join(f"T={T} {r:.2f}x" for T, r in ratios.items()))
    for note in notes:
        print("note:", note)
    print(f"device: {gpu_or_cpu}; wrote {args.json}")
    return 0


def scaling(rows: list[dict]) -> dict:
    """layer -> {T: forward+backward time per token at T / that at the first T measured} (rows hold B*T tokens:
    one sequence longer than --tokens is a batch of one, so compare per token, not per row)."""
    per_token: dict = {}
    for row in rows:
        if not row.get("error"):
            per_token.setdefault(row["layer"], {})[row["seq_len"]] = row["forward_backward_ms"] / row["tokens"]
    return {layer: {T: t / next(iter(times.values())) for T, t in times.items()}
            for layer, times in per_token.items() if len(times) > 1}


def _print_row(row: dict) -> None:
    if row.get("error"):
        print(f"{row['layer']:<36} {row['batch']:>3}x{row['seq_len']:<6} {row['error']}")
        return
    peak = "-" if row["peak_train_mib"] is None else f"{row['peak_train_mib']:.0f}"
    ktok = row["tokens"] / row["forward_backward_ms"]
    print(f"{row['layer']:<36} {row['batch']:>3}x{row['seq_len']:<6} fwd {row['forward_ms']:8.2f} ms  "
          f"fwd+bwd {row['forward_backward_ms']:8.2f} ms  ({ktok:7.1f}k tok/s)  peak {peak} MiB")
    if row.get("phase_peaks_mib"):
        print(" " * 48 + "phase peaks (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in row["phase_peaks_mib"].items()))


if __name__ == "__main__":
    sys.exit(main())
