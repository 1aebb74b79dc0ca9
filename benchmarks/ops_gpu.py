"""GPU speed of the gated delta rule: memmix's Triton kernels (the default choice, and each form forced: fused
recurrent, chunked) vs memmix.ops chunk (PyTorch) and, when importable, flash-linear-attention's
chunk_gated_delta_rule.

Forward and forward+backward medians from triton.testing.do_bench, plus each output's relative error vs the
float32 PyTorch chunk form on the same inputs. Case sets (--cases): "lm" (dense B=8, T=2048, H=4, K=V=256 and a
packed varlen batch of 32 uneven segments), "recall" (the recall models' shapes: B=64, T=256 with heads of 16 and
of 64), "crossover" (B=8, T=2048, H=1024/K heads of K = 16 ... 256: where the recurrent form stops winning).
Prints a table and writes JSON (atomically).

    python benchmarks/ops_gpu.py [--cases lm,recall] [--dtypes bf16,fp32] [--impls ...] [--json PATH]
                                 [--skip-pytorch] [--forward-only]

--forward-only skips every backward (fla's backward kernels take minutes to compile and autotune).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from common import atomic_write_json

DEFAULT_JSON = os.path.join(os.path.dirname(__file__), "results", "ops_gpu.json")


def uneven_lengths(num_segments: int, total: int, seed: int = 0) -> list[int]:
    """num_segments lengths >= 1 summing to total, spread unevenly (log-uniform weights)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.exp(torch.rand(num_segments, generator=gen) * 4.0)  # lengths differ up to ~50x
    lengths = (weights / weights.sum() * (total - num_segments)).floor().long() + 1
    lengths[0] += total - int(lengths.sum())
    return lengths.tolist()


def make_inputs(B: int, T: int, H: int, K: int, V: int, lengths, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """Inputs as a model makes them: unit-norm q/k, log-sigmoid decays, sigmoid beta; all requiring grad."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    inputs = {"q": F.normalize(rand(B, T, H, K), dim=-1), "k": F.normalize(rand(B, T, H, K), dim=-1),
              "v": rand(B, T, H, V), "g": F.logsigmoid(rand(B, T, H) + 2.0), "beta": torch.sigmoid(rand(B, T, H))}
    inputs = {n: x.to(dtype).requires_grad_(True) for n, x in inputs.items()}
    inputs["cu_seqlens"] = (None if lengths is None else
                            torch.tensor([0] + list(lengths), device="cuda").cumsum(0))
    return inputs


def memmix_triton(inputs: dict) -> torch.Tensor:
    from memmix.ops.triton import chunk_gated_delta_rule
    return chunk_gated_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                  cu_seqlens=inputs["cu_seqlens"])[0]


def memmix_recurrent(inputs: dict) -> torch.Tensor:
    from memmix.ops.triton.recurrent_delta_rule import recurrent_gated_delta_rule
    return recurrent_gated_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                      cu_seqlens=inputs["cu_seqlens"])[0]


def memmix_chunked(inputs: dict) -> torch.Tensor:
    from memmix.ops.triton.gated_delta_rule import chunk_gated_delta_rule
    return chunk_gated_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                  cu_seqlens=inputs["cu_seqlens"])[0]


def memmix_chunk(inputs: dict) -> torch.Tensor:
    from memmix.ops import gated_delta_rule
    return gated_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                            cu_seqlens=inputs["cu_seqlens"], impl="chunk")[0]


def fla_chunk(inputs: dict) -> torch.Tensor:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return chunk_gated_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                  cu_seqlens=inputs["cu_seqlens"])[0]


IMPLS = {"memmix-triton": memmix_triton, "memmix-recurrent": memmix_recurrent, "memmix-chunked": memmix_chunked,
         "memmix-chunk (PyTorch)": memmix_chunk}
CASES = {
    "lm": {"dense B=8 T=2048 H=4 K=V=256": dict(B=8, T=2048, H=4, K=256, V=256, lengths=None),
           "varlen 32 segs, 32768 tok, H=4 K=V=256": dict(B=1, T=32768, H=4, K=256, V=256,
                                                         lengths=uneven_lengths(32, 32768))},
    "recall": {"dense B=64 T=256 H=8 K=V=16": dict(B=64, T=256, H=8, K=16, V=16, lengths=None),
               "dense B=64 T=256 H=2 K=V=64": dict(B=64, T=256, H=2, K=64, V=64, lengths=None)},
    "crossover": {f"dense B=8 T=2048 H={1024 // K} K=V={K}": dict(B=8, T=2048, H=1024 // K, K=K, V=K, lengths=None)
                  for K in (256, 128, 64, 32, 16)},
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def available_impls(names: list[str], skip_pytorch: bool) -> dict:
    """name -> function(inputs) -> o; fla only when it imports (its backward unlocked if it refuses)."""
    impls = {name: IMPLS[name] for name in names if name in IMPLS}
    if skip_pytorch:
        impls.pop("memmix-chunk (PyTorch)", None)
    if "fla chunk" not in names:
        return impls
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        impls["fla chunk"] = fla_chunk
    except Exception as exc:  # noqa: BLE001 - any import failure just drops the column
        print(f"flash-linear-attention not importable ({type(exc).__name__}: {exc}); skipping it")
    return impls


def unlock_fla_backward(inputs: dict) -> bool:
    """Run fla's backward once; if it refuses on Triton < 3.7.1 (Hopper), unlock it for timing only."""
    o = fla_chunk(inputs)
    try:
        o.backward(torch.ones_like(o))
        return False
    except RuntimeError as exc:
        if "3.7.1" not in str(exc):
            raise
    import fla.ops.common.chunk_o as chunk_o
    chunk_o.TRITON_ABOVE_3_7_1 = True
    print("NOTE: fla's backward refuses on this Triton (< 3.7.1 on Hopper, known wrong gradients there); "
          "set fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True: its backward times are for timing only")
    return True


def time_impl(fn, inputs: dict, forward_only: bool = False) -> tuple[float, float | None]:
    """(forward ms, forward+backward ms or None when forward_only), do_bench medians."""
    from triton.testing import do_bench

    leaves = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
    do = torch.randn_like(fn(inputs))

    def forward():
        with torch.no_grad():
            fn(inputs)

    def forward_backward():
        fn(inputs).backward(do)

    fwd = do_bench(forward, warmup=50, rep=300, return_mode="median")
    if forward_only:
        return fwd, None
    fwd_bwd = do_bench(forward_backward, warmup=50, rep=300, grad_to_none=leaves, return_mode="median")
    return fwd, fwd_bwd


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=DEFAULT_JSON, help="where to write the results (default: %(default)s)")
    parser.add_argument("--skip-pytorch", action="store_true", help="leave out the PyTorch chunk form")
    parser.add_argument("--forward-only", action="store_true", help="time the forward alone (no backward compiled)")
    parser.add_argument("--cases", default="lm", help=f"comma-separated case sets of {tuple(CASES)}")
    parser.add_argument("--dtypes", default="bf16", help=f"comma-separated dtypes of {tuple(DTYPES)}")
    parser.add_argument("--impls", default="memmix-triton,memmix-chunk (PyTorch),fla chunk",
                        help=f"comma-separated implementations of {tuple(IMPLS) + ('fla chunk',)}")
    args = parser.parse_args()
    case_sets, dtypes, names = (x.split(",") for x in (args.cases, args.dtypes, args.impls))
    for flag, values, allowed in (("--cases", case_sets, CASES), ("--dtypes", dtypes, DTYPES),
                                  ("--impls", names, tuple(IMPLS) + ("fla chunk",))):
        if any(value not in allowed for value in values):
            parser.error(f"argument {flag}: choose from {tuple(allowed)}, got {values}")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/ops_gpu.py needs a CUDA GPU")
    import triton

    cases = [(f"{name} {dtype}", dict(shape, dtype=DTYPES[dtype])) for case_set in case_sets
             for name, shape in CASES[case_set].items() for dtype in dtypes]
    impls = available_impls(names, args.skip_pytorch)
    fla_unlocked = False
    rows = []
    for case_name, shape in cases:
        inputs = make_inputs(**shape)
        if "fla chunk" in impls and not fla_unlocked and not args.forward_only:
            try:
                fla_unlocked = unlock_fla_backward(inputs)
            except Exception as exc:  # noqa: BLE001 - a broken fla install drops its column, not the run
                print(f"fla chunk failed ({type(exc).__name__}: {str(exc)[:200]}); skipping it")
                del impls["fla chunk"]
        with torch.no_grad():
            reference = memmix_chunk(inputs)  # float32 math on the same bf16 inputs
        for impl_name, fn in impls.items():
            try:
                with torch.no_grad():
                    error = rel_diff(fn(inputs), reference)
            except ValueError as exc:  # a form forced beyond its limits (the recurrent kernels at K = 256)
                print(f"{case_name:42s} {impl_name:24s} skipped: {exc}", flush=True)
                continue
            fwd, fwd_bwd = time_impl(fn, inputs, args.forward_only)
            rows.append(dict(case=case_name, impl=impl_name, forward_ms=fwd, forward_backward_ms=fwd_bwd,
                             rel_err_vs_fp32_chunk=error))
            print(f"{case_name:42s} {impl_name:24s} fwd {fwd:8.3f} ms  fwd+bwd {_ms(fwd_bwd, 8)} ms  "
                  f"|o - o_fp32|/|o_fp32| {error:.1e}", flush=True)
            atomic_write_json(args.json, dict(device=torch.cuda.get_device_name(), partial=True, results=rows))
        del inputs
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, triton {triton.__version__}, do_bench medians")
    print(f"| {'case':47s} | {'impl':24s} | {'fwd ms':>8s} | {'fwd+bwd ms':>10s} | {'o rel err':>9s} |")
    print(f"|{'-' * 49}|{'-' * 26}|{'-' * 10}|{'-' * 12}|{'-' * 11}|")
    for row in rows:
        print(f"| {row['case']:47s} | {row['impl']:24s} | {row['forward_ms']:8.3f} | "
              f"{_ms(row['forward_backward_ms'], 10)} | {row['rel_err_vs_fp32_chunk']:9.1e} |")
    atomic_write_json(args.json, dict(device=device, torch=torch.__version__, triton=triton.__version__,
                                      dtypes=dtypes, fla_backward_unlocked=fla_unlocked, results=rows))
    print(f"wrote {args.json}")


def _ms(value: float | None, width: int) -> str:
    return "-".rjust(width) if value is None else f"{value:{width}.3f}"


if __name__ == "__main__":
    main()
