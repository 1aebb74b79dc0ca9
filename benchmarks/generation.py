"""Generation speed: tokens/s, peak memory and cache size of greedy generate() with a cache.

Models (same width): our MoM LM (CUDA-graph decoding on, and off), a softmax Transformer with a KV cache
(our all-attention config), and, when importable, flash-linear-attention's MomForCausalLM and
GatedDeltaNetForCausalLM.

    python benchmarks/generation.py                                  # the whole grid on CUDA
    python benchmarks/generation.py --batch-sizes 16 --prompts 512   # one cell
    python benchmarks/generation.py --device cpu --hidden 64 --heads 2 --head-dim 32 --batch-sizes 2 --prompts 16 --new-tokens 8

"decode tok/s" counts the tokens of the decode steps over their time alone: the median generate() time with
--new-tokens minus the median with one new token (the same prompt and prefill), over --new-tokens - 1 steps.
Prompts with batch x prompt above --max-prefill-tokens are skipped (printed), since the prefill's activations would not fit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import atomic_write_json, device_name, only_matching  # noqa: E402
from memmix import MoMConfig, MoMForCausalLM  # noqa: E402


def build_models(args) -> tuple[dict, list[str]]:
    notes = []
    width = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers)
    mom = MoMForCausalLM(MoMConfig(**width, num_heads=args.heads, head_dim=args.head_dim, num_memories=4, topk=2,
                                   shared_mem=True, expand_v=1.0))
    transformer = MoMForCausalLM(MoMConfig(**width, num_heads=args.heads, head_dim=args.head_dim,
                                           attn_layers=list(range(args.layers)),
                                           attn_num_heads=args.hidden // 128 if args.hidden >= 128 else 2))
    models = {"memmix MoM (CUDA graph)": (mom, True), "memmix MoM (eager)": (mom, False),
              "Transformer + KV cache": (transformer, False)}
    if args.device == "cuda" and not args.no_fla:
        try:
            from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, MomConfig
            from fla.models import MomForCausalLM as FlaMom

            shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         head_dim=args.head_dim, num_heads=args.heads, expand_v=1)
            models["fla MomForCausalLM"] = (FlaMom(MomConfig(**shape, num_memories=4, topk=2, shared_mem=True)), None)
            models["fla GatedDeltaNet"] = (GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**shape)), None)
        except ImportError as err:
            notes.append(f"flash-linear-attention not importable ({err}); its rows are skipped")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    for model, _ in models.values():
        model.to(args.device, dtype).eval()
    return models, notes


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_cell(model, graph, batch: int, prompt: int, args) -> dict:
    if graph is not None:
        model.cuda_graph_decoding = graph
    ids = torch.randint(0, args.vocab, (batch, prompt), device=args.device)

    def generate(new_tokens: int):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    generate(args.new_tokens)  # warm-up: kernels, CUDA graph capture for this batch size
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    total = statistics.median(timed(lambda: generate(args.new_tokens), args.device) for _ in range(args.repeats))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if args.device == "cuda" else None
    # the same prefill plus one token: the difference is the time of the other new_tokens - 1 decode steps
    first = statistics.median(timed(lambda: generate(1), args.device) for _ in range(args.repeats))
    steps = args.new_tokens - 1
    decode = max(total - first, 1e-9)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out["cache"] if "cache" in out else out.past_key_values  # ours names it `cache`; HF models do not
    return {"generate_s": total, "prefill_and_first_s": first, "decode_tok_per_s": batch * steps / decode,
            "ms_per_step": decode / steps * 1e3, "peak_mib": peak, "cache_mib": tensor_bytes(cache) / 2**20}


def tensor_bytes(obj, depth: int = 5) -> int:
    """Bytes of the distinct tensors reachable from a cache object (attributes, lists, dicts), a few levels deep."""
    seen: dict[int, int] = {}

    def walk(node, level: int) -> None:
        if isinstance(node, torch.Tensor):
            seen[node.untyped_storage().data_ptr()] = node.untyped_storage().nbytes()
        elif level < depth and isinstance(node, (list, tuple)):
            for item in node:
                walk(item, level + 1)
        elif level < depth and isinstance(node, dict):
            for item in node.values():
                walk(item, level + 1)
        elif level < depth and hasattr(node, "__dict__"):
            for item in vars(node).values():
                walk(item, level + 1)

    walk(obj, 0)
    return sum(seen.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--prompts", default="512,8192,32768")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-prefill-tokens", type=int, default=2**19)
    p.add_argument("--only", default="", help="comma list of substrings: run only matching models")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--json", default="benchmarks/results/generation.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    models, notes = build_models(args)
    models = only_matching(models, args.only)
    gpu_or_cpu = device_name(args.device)
    rows = []
    print(f"{'model':<26} {'batch':>5} {'prompt':>6} {'decode tok/s':>13} {'ms/step':>8} {'generate s':>10} "
          f"{'peak MiB':>9} {'cache MiB':>9}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for prompt in [int(t) for t in args.prompts.split(",")]:
            for name, (model, graph) in models.items():
                row = {"model": name, "batch": batch, "prompt": prompt}
                if batch * prompt > args.max_prefill_tokens:
                    row["error"] = f"skipped: batch x prompt > --max-prefill-tokens={args.max_prefill_tokens}"
                else:
                    try:
                        row.update(run_cell(model, graph, batch, prompt, args))
                    except torch.cuda.OutOfMemoryError:
                        row["error"] = "out of memory"
                        torch.cuda.empty_cache()
                    except Exception as err:  # one baseline failing must not hide the other rows
                        row["error"] = f"{type(err).__name__}: {err}"[:200]
                rows.append(row)
                _print_row(row)
                # rewritten after every row: a run stopped at a time limit keeps what it measured
                atomic_write_json(args.json, {"device": gpu_or_cpu, "torch": torch.__version__, "args": vars(args),
                                              "notes": notes, "rows": rows})
    for note in notes:
        print("note:", note)
    print(f"device: {gpu_or_cpu}; wrote {args.json}")
    return 0


def _print_row(row: dict) -> None:
    head = f"{row['model']:<26} {row['batch']:>5} {row['prompt']:>6}"
    if "error" in row:
        print(f"{head} {row['error']}")
        return
    peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
    print(f"{head} {row['decode_tok_per_s']:>13.0f} {row['ms_per_step']:>8.2f} {row['generate_s']:>10.2f} {peak:>9} "
          f"{row['cache_mib']:>9.1f}")


if __name__ == "__main__":
    sys.exit(main())
