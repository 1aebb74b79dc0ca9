"""The `memmix` command. Each sub-command is a thin wrapper over the library.

Sub-commands register themselves through one `_add_<name>` function each, so separate
sub-commands never share code paths here.
"""
from __future__ import annotations

import argparse
import sys


def _add_recall(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recall", help="MQAR associative-recall benchmark: train and compare models",
        description="Train several models on multi-query associative recall (MQAR) under one budget and print "
                    "their accuracy per (seq_len, num_kv_pairs). Options given override the preset.")
    p.add_argument("--preset", choices=["default", "paper"], default="default",
                   help="default: the CPU demo (~6.5 min on 2 cores); paper: the Zoology-style grid (for a GPU)")
    p.add_argument("--models", help="comma list of: attention, mom, gdn, linear (and any registered model)")
    p.add_argument("--seq-len", dest="seq_lens", nargs="+", help="sequence lengths, e.g. 64,128")
    p.add_argument("--num-kv-pairs", dest="num_kv_pairs", nargs="+", help="key-value pair counts, e.g. 4,8,16")
    p.add_argument("--d-model", dest="d_models", nargs="+", help="model widths, e.g. 64 (several: one row each)")
    p.add_argument("--layers", dest="num_layers", type=int)
    p.add_argument("--head-dim", dest="head_dim", type=int)
    p.add_argument("--steps", type=int, help="training steps per model (the shared budget)")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--vocab-size", dest="vocab_size", type=int)
    p.add_argument("--num-train", dest="num_train", type=int, help="training sequences per seq_len")
    p.add_argument("--num-test", dest="num_test", type=int, help="test sequences per (seq_len, num_kv_pairs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--threads", dest="num_threads", type=int,
                   help="CPU threads (default 1: these tiny models gain little from more; 0 = torch's default)")
    p.add_argument("--workers", type=int,
                   help="training runs at once, each in its own process (default 0: one per CPU core on the CPU, "
                        "1 on CUDA); results do not depend on it")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write all settings and results here")
    p.add_argument("--plot", dest="plot_path", metavar="PATH", help="write a PNG of accuracy against num_kv_pairs")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.add_argument("--task", choices=["mqar", "mixed"], default="mqar",
                   help="mqar: compare models on MQAR; mixed: mixed-modal recall, modality-aware against "
                        "modality-blind memory routing (--models aware,blind[,aware+moe], --topk)")
    p.add_argument("--topk", dest="topks", nargs="+", help="--task mixed: top-k values to compare, e.g. 1,2")
    p.add_argument("--num-segments", dest="num_segments", type=int,
                   help="--task mixed: segments per modality (they alternate)")
    p.error = _recall_error  # type: ignore[method-assign]  # one line, exit 2, like the checks below
    p.set_defaults(func=lambda args: _run_mixed_recall(args) if args.task == "mixed" else _run_recall(args))


_RECALL_OPTIONS = {"seq_lens": "--seq-len", "num_kv_pairs": "--num-kv-pairs", "d_models": "--d-model",
                   "num_layers": "--layers", "num_threads": "--threads"}
_RECALL_LIST_FIELDS = ("seq_lens", "num_kv_pairs", "d_models")


def _recall_error(message: str) -> None:
    print(f"memmix recall: error: {message}", file=sys.stderr)
    sys.exit(2)


def _recall_settings(args: argparse.Namespace):
    """RecallSettings from the preset, overridden by every option given; ValueError names the bad option."""
    import torch
    from memmix.evaluation.recall import PRESETS, RecallSettings

    values = dict(PRESETS[args.preset])
    values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if args.models is not None:
        values["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in _RECALL_LIST_FIELDS:
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _recall_int_list(name, raw)
    for name in ("num_layers", "head_dim", "steps", "lr", "batch_size", "vocab_size", "num_train", "num_test",
                 "seed", "device", "num_threads", "workers"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return RecallSettings(**values)


def _recall_int_list(name: str, raw: list[str]) -> list[int]:
    items = [x for chunk in raw for x in chunk.split(",") if x.strip()]
    try:
        return [int(x) for x in items]
    except ValueError:
        option = _RECALL_OPTIONS.get(name, f"--{name}")
        raise ValueError(f"{option}: expected integers separated by commas, got {','.join(raw)}") from None


def _run_recall(args: argparse.Namespace) -> int:
    from memmix.evaluation import recall
    from memmix.files import atomic_write_json

    try:
        settings = _recall_settings(args)
        recall.validate_settings(settings)
    except recall.RecallSettingError as err:
        option = _RECALL_OPTIONS.get(err.setting, "--" + err.setting.replace("_", "-"))
        _recall_error(f"{option}: {err.detail}")
    except ValueError as err:
        _recall_error(str(err))
    report = recall.run_recall(settings, progress=args.progress)
    print(recall.format_table(report))
    if args.json_path:
        atomic_write_json(args.json_path, report.as_dict())
    if args.plot_path:
        recall.plot_accuracy(report, args.plot_path)
    print(recall.summary_line(report))
    return 0


def _run_mixed_recall(args: argparse.Namespace) -> int:
    """`memmix recall --task mixed`: memmix.evaluation.mixed_recall with the recall options that apply."""
    import torch
    from memmix.evaluation import mixed_recall as mixed
    from memmix.evaluation.recall import RecallSettingError
    from memmix.files import atomic_write_json

    options = {**_RECALL_OPTIONS, "topks": "--topk", "num_segments": "--num-segments"}
    if args.preset != "default" or args.plot_path or args.workers is not None:
        _recall_error("--preset, --plot and --workers apply to --task mqar only")
    values = {"device": "cuda" if torch.cuda.is_available() else "cpu"}
    try:
        if args.models is not None:
            values["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        for name in ("seq_lens", "num_kv_pairs", "d_models", "topks"):
            if getattr(args, name) is not None:
                values[name] = [int(x) for chunk in getattr(args, name) for x in chunk.split(",") if x.strip()]
        for name in ("num_layers", "head_dim", "steps", "lr", "batch_size", "vocab_size", "num_train", "num_test",
                     "seed", "device", "num_threads", "num_segments"):
            if getattr(args, name) is not None:
                values[name] = getattr(args, name)
        settings = mixed.MixedRecallSettings(**values)
        mixed.validate_mixed_settings(settings)
    except RecallSettingError as err:
        _recall_error(f"{options.get(err.setting, '--' + err.setting.replace('_', '-'))}: {err.detail}")
    except ValueError as err:
        _recall_error(f"{options.get(name, '--' + name)}: expected integers separated by commas ({err})")
    report = mixed.run_mixed_recall(settings, progress=args.progress)
    print(mixed.format_mixed_table(report))
    if args.json_path:
        atomic_write_json(args.json_path, report.as_dict())
    print(mixed.mixed_summary_line(report))
    return 0


def _one_line_errors(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Parser errors (bad value, unknown option) as one line + exit 2, unknown options with a suggestion."""
    import difflib

    def error(message: str) -> None:
        print(f"{p.prog}: error: {message}; see `{p.prog} --help`", file=sys.stderr)
        sys.exit(2)

    parse_known = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = parse_known(args, namespace)
        if extras:
            options = [o for a in p._actions for o in a.option_strings]
            close = difflib.get_close_matches(extras[0].split("=")[0], options, n=1)
            error(f"unknown option '{extras[0]}'" + (f" (did you mean {close[0]}?)" if close else ""))
        return namespace, extras

    p.error = error  # type: ignore[method-assign]
    p.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return p


def _run_reporting_input_errors(prog: str, fn, args: argparse.Namespace) -> int:
    """Run a sub-command; bad user input (memmix InputError) becomes one line on stderr and exit status 2."""
    from memmix.data.errors import InputError

    try:
        return int(fn(args) or 0)
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (the last checkpoint is kept; --resume continues)", file=sys.stderr)
        return 130


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = _one_line_errors(sub.add_parser(
        "prepare", allow_abbrev=False, help="tokenise text into binary token shards for training",
        description="Tokenise documents (text files/folders, JSONL, a saved or hub dataset) into memory-mapped "
                    "token shards (*.mmtok) with checksummed headers."))
    p.add_argument("data", help="text file or folder, JSONL file, saved dataset folder, or hf:NAME")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--tokenizer", default="byte", help="'byte' (built in) or a local Hugging Face tokenizer folder")
    p.add_argument("--data-format", default="auto", choices=["auto", "text", "jsonl", "hf"])
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--doc-separator", default=None, help="split plain-text files into documents at this string")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (documents are not split)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=lambda args: _run_reporting_input_errors("memmix prepare", _run_prepare, args))


def _run_prepare(args: argparse.Namespace) -> int:
    from memmix.data.prepare import prepare_shards
    from memmix.data.shards import read_header
    from memmix.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    paths = prepare_shards(args.data, args.out, tokenizer, args.tokenizer, args.data_format, args.text_field,
                           args.split, args.doc_separator, args.shard_tokens, args.overwrite, args.progress)
    tokens = sum(int(read_header(p)["num_tokens"]) for p in paths)
    print(f"wrote {len(paths)} shard(s), {tokens:,} tokens, to {args.out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from memmix.training.config import add_config_flags

    p = _one_line_errors(sub.add_parser(
        "train", allow_abbrev=False, help="train a language model (single GPU/CPU, or DDP/FSDP under torchrun)",
        description="Pre-train a MoM / GDN / Transformer language model. Settings: defaults < --config file < flags. "
                    "Multi-GPU: torchrun --nproc_per_node N -m memmix.cli train ... --parallel ddp|fsdp"))
    p.add_argument("--config", help="YAML or JSON file of settings (keys as the flags, '-' or '_')")
    add_config_flags(p)
    p.set_defaults(func=lambda args: _run_reporting_input_errors("memmix train", _run_train, args))


def _run_train(args: argparse.Namespace) -> int:
    from memmix.training.config import config_from_args
    from memmix.training.trainer import train

    result = train(config_from_args(args))
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"trained to step {result['step']}: loss {result['loss']:.4f}, {result['tokens']:,} tokens; "
              f"outputs in {result['out_dir']}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model (perplexity, lm-evaluation-harness)")
    tasks = p.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    ppl = _one_line_errors(tasks.add_parser(
        "ppl", allow_abbrev=False, help="perplexity on held-out text",
        description="Perplexity of a checkpoint / run folder / saved model on held-out data; each document is "
                    "scored on its own (memories reset), in disjoint (chunked) or sliding windows."))
    ppl.add_argument("--model", required=True, help="step_*.pt checkpoint, a run's --out-dir, or a saved model folder")
    ppl.add_argument("--data", required=True, help="held-out text file/folder, JSONL, dataset or shards")
    ppl.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the model")
    ppl.add_argument("--data-format", default="auto", choices=["auto", "text", "jsonl", "hf", "shards"])
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--split", default="validation", help="dataset split (hf datasets)")
    ppl.add_argument("--doc-separator", default=None)
    ppl.add_argument("--seq-len", type=int, default=1024, help="window length")
    ppl.add_argument("--mode", choices=["chunked", "sliding"], default="chunked")
    ppl.add_argument("--stride", type=int, default=None, help="sliding mode: tokens between windows (default seq_len/2)")
    ppl.add_argument("--tokens-per-batch", type=int, default=16384, help="tokens packed into one forward pass")
    ppl.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ppl.add_argument("--json", dest="json_path", metavar="PATH", help="also write the result here")
    ppl.set_defaults(func=lambda args: _run_reporting_input_errors("memmix eval ppl", _run_eval_ppl, args))
    lm = tasks.add_parser("lm-eval", add_help=False,
                          help="lm-evaluation-harness with memmix registered (every argument goes to lm_eval)")
    lm.parse_known_args = _pass_everything_to_lm_eval  # type: ignore[method-assign]


def _pass_everything_to_lm_eval(args=None, namespace=None):
    """argparse would reject lm_eval's own options; take them all verbatim instead."""
    namespace = namespace or argparse.Namespace()
    namespace.lm_eval_args = list(args or [])
    namespace.func = lambda parsed: __import__("memmix.evaluation.lm_eval", fromlist=["main"]).main(parsed.lm_eval_args)
    return namespace, []


def _run_eval_ppl(args: argparse.Namespace) -> int:
    import json

    from memmix.data.corpus import load_corpus
    from memmix.evaluation.loading import default_device, load_model_and_tokenizer
    from memmix.evaluation.perplexity import perplexity
    from memmix.files import atomic_write_text

    device = args.device or default_device()
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
    corpus = load_corpus(args.data, tokenizer, args.tokenizer or tokenizer.name, args.data_format, args.text_field,
                         args.split, args.doc_separator)
    result = perplexity(model, corpus.documents(), args.seq_len, args.stride, args.mode, args.tokens_per_batch, device)
    result.update(model=args.model, data=args.data, mode=args.mode, seq_len=args.seq_len)
    print(f"perplexity {result['ppl']:.4f} (nll {result['nll']:.4f} nats/token) over {result['tokens']:,} tokens "
          f"in {result['documents']} documents")
    if args.json_path:
        atomic_write_text(args.json_path, json.dumps(result, indent=2))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = _one_line_errors(sub.add_parser(
        "generate", allow_abbrev=False, help="generate text from a prompt (streams to stdout)",
        description="Sample a continuation of --prompt from a checkpoint, run folder or saved model folder."))
    p.add_argument("--model", required=True, help="step_*.pt checkpoint, a run's --out-dir, or a saved model folder")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=lambda args: _run_reporting_input_errors("memmix generate", _run_generate, args))


def _run_generate(args: argparse.Namespace) -> int:
    from memmix.data.errors import InputError
    from memmix.evaluation.generate import generate_ids, stream_text
    from memmix.evaluation.loading import default_device, load_model_and_tokenizer

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = args.device or default_device()
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    ids = generate_ids(model, [int(i) for i in tokenizer.encode(prompt)], args.max_new_tokens, args.temperature,
                       args.top_p, tokenizer.eos_token_id, args.seed, device, tokenizer.vocab_size)
    sys.stdout.write(prompt)
    for piece in stream_text(tokenizer, ids):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _not_ready(name: str) -> int:
    print(f"memmix {name}: not available in this build", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memmix", description="Mixture-of-Memories models: train, evaluate, benchmark")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_recall(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
