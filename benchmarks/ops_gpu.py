"""GPU speed of the chunked gated delta rule: memmix Triton kernels vs memmix.ops chunk (PyTorch) and, when
importable, flash-linear-attention's chunk_gated_delta_rule.

Forward and forward+backward medians from triton.testing.do_bench on a dense bf16 batch (B=8, T=2048, H=4,
K=V=256) and a packed varlen batch (32 uneven segments, 32768 tokens), plus each output's relative error vs
the float32 PyTorch chunk form on the same bf16 inputs. Prints a table and writes JSON (atomically).

    python benchmarks/ops_gpu.py [--json benchmarks/results/ops_gpu.json] [--skip-pytorch] [--forward-only]

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


def memmix_chunk(inputs: dict) -> torch.Tensor:
    from memmix.ops import gated_delta_rule
    return gated_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                            cu_seqlens=inputs["cu_seqlens"], impl="chunk")[0]


def fla_chunk(inputs: dict) -> torch.Tensor:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return chunk_gated_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                                  cu_seqlens=inputs["cu_seqlens"])[0]


def available_impls(skip_pytorch: bool) -> dict:
    """name -> function(inputs) -> o; fla only when it imports (its backward unlocked if it refuses)."""
    impls = {"memmix-triton": memmix_triton}
    if not skip_pytorch:
        impls["memmix-chunk (PyTorch)"] = memmix_chunk
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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/ops_gpu.py needs a CUDA GPU")
    import triton

    cases = {
        "dense B=8 T=2048 H=4 K=V=256": dict(B=8, T=2048, H=4, K=256, V=256, lengths=None),
        "varlen 32 segs, 32768 tok, H=4 K=V=256": dict(B=1, T=32768, H=4, K=256, V=256,
                                                      lengths=uneven_lengths(32, 32768)),
    }
    impls = available_impls(args.skip_pytorch)
    fla_unlocked = False
    rows = []
    for case_name, shape in cases.items():
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
            with torch.no_grad():
                error = rel_diff(fn(inputs), reference)
            fwd, fwd_bwd = time_impl(fn, inputs, args.forward_only)
            rows.append(dict(case=case_name, impl=impl_name, forward_ms=fwd, forward_backward_ms=fwd_bwd,
                             rel_err_vs_fp32_chunk=error))
            print(f"{case_name:42s} {impl_name:24s} fwd {fwd:8.3f} ms  fwd+bwd {_ms(fwd_bwd, 8)} ms  "
                  f"|o - o_fp32|/|o_fp32| {error:.1e}", flush=True)
        del inputs
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, triton {triton.__version__}, bf16, do_bench medians")
    print(f"| {'case':42s} | {'impl':24s} | {'fwd ms':>8s} | {'fwd+bwd ms':>10s} | {'o rel err':>9s} |")
    print(f"|{'-' * 44}|{'-' * 26}|{'-' * 10}|{'-' * 12}|{'-' * 11}|")
    for row in rows:
        print(f"| {row['case']:42s} | {row['impl']:24s} | {row['forward_ms']:8.3f} | "
              f"{_ms(row['forward_backward_ms'], 10)} | {row['rel_err_vs_fp32_chunk']:9.1e} |")
    atomic_write_json(args.json, dict(device=device, torch=torch.__version__, triton=triton.__version__,
                                      dtype="bfloat16", fla_backward_unlocked=fla_unlocked, results=rows))
    print(f"wrote {args.json}")


def _ms(value: float | None, width: int) -> str:
    return "-".rjust(width) if value is None else f"{value:{width}.3f}"


if __name__ == "__main__":
    main()
