"""Length generalisation on MQAR: train tiny B'MOJO / B'MOJO-F / MoM models at one length, test at up to 4x.

Every model sees the same MQAR training batches (memmix.data.mqar) at --train-len and is tested on fresh
sequences of 1x, 2x and 4x that length with the same number of key-value pairs (queries then sit further from
their pairs, among more noise). Prints a table and writes JSON (atomically).

    python benchmarks/bmojo_length.py                       # CPU, 1 thread: ~10 minutes on an idle core
    python benchmarks/bmojo_length.py --models bmojo --steps 300 --json out.json

MQAR learning has sudden phase transitions, so a model that has not yet "clicked" within --steps shows low
accuracy at every length; compare generalisation (acc@4x vs acc@1x) only between models that learned the task.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from common import atomic_write_json

from memmix.data.mqar import generate_mqar, split_seed
from memmix.labels import IGNORE_INDEX
from memmix.models import MoMConfig, MoMForCausalLM
from memmix.models.configuration_bmojo import BMojoConfig
from memmix.models.modeling_bmojo import BMojoForCausalLM


# The better of {1e-3, 3e-3} for each model at the default settings (MoM does not learn MQAR at 3e-3 in 1200 steps,
# the B'MOJO models not at 1e-3).
DEFAULT_LR = {"bmojo": 3e-3, "bmojo-f": 3e-3, "mom": 1e-3}


def build_models(args) -> dict[str, torch.nn.Module]:
    """The compared models, all with the same width, depth, head size and MLP."""
    heads = args.d_model // args.head_dim
    common = dict(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
                  intermediate_size=2 * args.d_model, num_heads=heads, head_dim=args.head_dim,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)
    bmojo = dict(common, window_size=args.window, chunk_size=args.chunk, eidetic_size=args.store,
                 eidetic_per_chunk=args.admit)
    builders = {
        "bmojo": lambda: BMojoForCausalLM(BMojoConfig(**bmojo)),
        "bmojo-f": lambda: BMojoForCausalLM(BMojoConfig(**dict(bmojo, eidetic_size=0, eidetic_per_chunk=0))),
        "mom": lambda: MoMForCausalLM(MoMConfig(**common, num_memories=4, topk=2, shared_mem=True)),
    }
    models = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        models[name] = builders[name]()
    return models


def train(model: torch.nn.Module, data, args, lr: float) -> tuple[float, float]:
    """AdamW with linear warm-up and decay; returns (mean loss of the last 10% of steps, seconds)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup))))
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):
        index = torch.randint(0, len(data), (args.batch,), generator=generator)
        batch = data.subset(index)
        loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    tail = losses[-max(1, args.steps // 10):]
    return sum(tail) / len(tail), time.perf_counter() - start


@torch.no_grad()
def accuracy(model: torch.nn.Module, data, batch_size: int = 64) -> float:
    """Fraction of queried values predicted (argmax) at their key position."""
    model.eval()
    correct = total = 0
    for start in range(0, len(data), batch_size):
        batch = data.subset(slice(start, start + batch_size))
        predicted = model(input_ids=batch.input_ids, use_cache=False).logits[:, :-1].argmax(-1)
        target = batch.labels[:, 1:]
        mask = target != IGNORE_INDEX
        correct += int((predicted[mask] == target[mask]).sum())
        total += int(mask.sum())
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bmojo", "bmojo-f", "mom"], choices=["bmojo", "bmojo-f", "mom"])
    parser.add_argument("--train-len", type=int, default=64)
    parser.add_argument("--test-mults", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kv-pairs", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--store", type=int, default=16)
    parser.add_argument("--admit", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak learning rate for every model (default: per model, {DEFAULT_LR})")
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--num-test", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--json", default="benchmarks/results/bmojo_length.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    train_data = generate_mqar(args.num_train, args.train_len, args.kv_pairs, args.vocab,
                               split_seed(args.seed, "train"))
    tests = {m * args.train_len: generate_mqar(args.num_test, m * args.train_len, args.kv_pairs, args.vocab,
                                               split_seed(args.seed, "test")) for m in args.test_mults}
    rows = []
    for name, model in build_models(args).items():
        lr = args.lr if args.lr is not None else DEFAULT_LR[name]
        loss, seconds = train(model, train_data, args, lr)
        acc = {length: accuracy(model, data) for length, data in tests.items()}
        params = sum(p.numel() for p in model.parameters())
        rows.append(dict(model=name, lr=lr, params=params, final_loss=loss, train_seconds=seconds,
                         accuracy={str(k): v for k, v in acc.items()}))
        print(f"{name}: loss {loss:.3f}, " + ", ".join(f"acc@{k} {v:.3f}" for k, v in acc.items()), flush=True)

    lengths = list(tests)
    accuracy_columns = " ".join(f"{'acc@' + str(t):>8}" for t in lengths)
    header = f"{'model':<9} {'lr':>6} {'params':>8} {'loss':>6} {accuracy_columns} {'train s':>8}"
    print(f"\nMQAR, train length {args.train_len}, {args.kv_pairs} pairs, vocab {args.vocab}, {args.steps} steps")
    print(header)
    for r in rows:
        accs = " ".join(f"{r['accuracy'][str(t)]:>8.3f}" for t in lengths)
        seconds = r["train_seconds"]
        print(f"{r['model']:<9} {r['lr']:>6g} {r['params']:>8,} {r['final_loss']:>6.3f} {accs} {seconds:>8.1f}")
    atomic_write_json(args.json, dict(settings=vars(args), results=rows, load_average=os.getloadavg()[0]))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
