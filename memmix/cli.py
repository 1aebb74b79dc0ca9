"""The `memmix` command. Each sub-command parses and checks its arguments, then calls the library.

Parsing imports neither torch nor transformers, so `--help` and argument errors are instant; the library loads once
the arguments are known to be good. One error path for every sub-command: a parse error, bad input found by the
library (memmix InputError, which may name the argument at fault; the flag is shown instead) or a bad recall
setting prints one line `memmix <command>: error: ...` and exits with status 2; Ctrl-C prints one line and exits
with status 130 (both raise SystemExit, as argparse does). `main` returns the exit status otherwise: 0, or 1 when
a result could not be written where asked and went to a fallback file (named on stderr).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import signal
import sys

from memmix.errors import InputError
from memmix.data.sources import ENCODING_ERRORS
from memmix.devices import parse_device, resolve_device

# a recall grid estimated to take longer than this on the CPU is refused there without --force (it is GPU-sized)
_CPU_RECALL_REFUSE_HOURS = 3.0


class UsageError(Exception):
    """Bad command-line input to sub-command `prog` (printed as one line, exit status 2)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


# ----------------------------------------------------------------------------------------------- parsing


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default value (booleans and empty defaults are left out)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "(default:" in text or not action.option_strings:
            return text
        if default is None or default is argparse.SUPPRESS or isinstance(default, bool) or default == "":
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse with memmix's error path: errors raise UsageError (one line, with a 'did you mean' for unknown
    options and choices); help shows defaults, also those that `lazy_defaults()` computes only when help is asked
    for; `passthrough` parsers keep every argument unparsed (for wrapped command lines)."""

    def __init__(self, *args, lazy_defaults=None, passthrough: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.lazy_defaults, self.passthrough = lazy_defaults, passthrough

    def error(self, message: str):
        raise UsageError(self.prog, f"{_with_suggestion(message)}; see `{self.prog} --help`")

    def parse_known_args(self, args=None, namespace=None):
        if self.passthrough:
            namespace = namespace or argparse.Namespace()
            for key, value in self._defaults.items():
                setattr(namespace, key, value)
            namespace.passthrough_args = list(sys.argv[1:] if args is None else args)
            return namespace, []
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            options = [o for action in self._actions for o in action.option_strings]
            close = difflib.get_close_matches(extras[0].split("=")[0], options, n=1)
            kind = "option" if extras[0].startswith("-") else "argument"
            self.error(f"unknown {kind} '{extras[0]}'" + (f" (did you mean {close[0]}?)" if close else ""))
        return namespace, extras

    def format_help(self) -> str:
        if self.lazy_defaults is not None:
            notes = self.lazy_defaults()
            for action in self._actions:
                if action.dest in notes and "(default:" not in (action.help or ""):
                    action.help = f"{action.help or ''} ({notes[action.dest]})".replace("%", "%%")
            self.lazy_defaults = None
        return super().format_help()


def _with_suggestion(message: str) -> str:
    """argparse's 'invalid choice' message, with the closest choice."""
    match = re.search(r"^(.*)invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if not match:
        return message
    choices = [c.strip().strip("'") for c in match.group(3).split(",")]
    close = difflib.get_close_matches(match.group(2), choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{match.group(1)}invalid choice '{match.group(2)}'{hint}; choose from {', '.join(choices)}"


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _device_type(text: str) -> str:
    try:
        return parse_device(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(err.detail) from None


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device_type, default="auto",
                   help="auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N")


def _add_encoding_errors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                   help="bytes that are not UTF-8: strict stops with the file and byte offset; replace reads them "
                        "as U+FFFD")


def _check_output(flag: str, path: str | None, is_dir: bool = False) -> None:
    """Fail before the work starts when an output path cannot be written."""
    if not path:
        return
    from memmix.files import check_writable

    reason = check_writable(path, is_dir=is_dir)
    if reason:
        raise InputError(reason, argument=flag)


def _write_output(prog: str, flag: str, path: str, write) -> bool:
    """write(path); if that fails after the work is done, write to a fallback file instead and say where.
    Returns False when the output did not land at `path`."""
    import tempfile

    try:
        write(path)
        print(f"{prog}: wrote {path}", file=sys.stderr)
        return True
    except OSError as err:
        reason = err.strerror or str(err)
    stem, ext = os.path.splitext(os.path.basename(path))
    fd, fallback = tempfile.mkstemp(prefix=f"memmix-{stem or 'output'}-", suffix=ext)
    os.close(fd)
    try:
        write(fallback)
    except OSError as err:
        print(f"{prog}: could not write {flag} '{path}' ({reason}) nor the fallback '{fallback}' "
              f"({err.strerror or err}); the results are only on screen", file=sys.stderr)
        return False
    print(f"{prog}: could not write {flag} '{path}' ({reason}); wrote it to {fallback} instead", file=sys.stderr)
    return False


def _model_input(path: str) -> str:
    """The file or folder that --model reads: a run folder's latest checkpoint (its other files are no input)."""
    from memmix.evaluation.loading import is_hf_folder
    from memmix.training.checkpoint import resolve_checkpoint

    if not os.path.isdir(path) or is_hf_folder(path):
        return path
    try:
        return resolve_checkpoint(path)
    except InputError:
        return path


def _read_prompt(text: str, errors: str) -> str:
    """--prompt text ('-': stdin) as valid UTF-8 text, under the --encoding-errors policy."""
    from memmix.data.sources import decode_utf8

    if text == "-":
        return decode_utf8(sys.stdin.buffer.read(), "stdin", errors)
    return decode_utf8(os.fsencode(text), "--prompt", errors)  # argv bytes that are not UTF-8 come as surrogates


# ----------------------------------------------------------------------------------------------- recall

# RecallSettings / MixedRecallSettings field -> (flag, kind, help); kind: "names" or "ints" (comma lists), int, float.
# A field that only one --task's settings have is refused for the other task.
_RECALL_OPTIONS = {
    "models": ("--models", "names", "comma list of models (mqar: attention, mom, gdn, gdn-wide, gdn-h64, mom-h64, "
                                    "linear, bmojo, bmojo-f, the mom-* ablations, and on CUDA with flash-linear-"
                                    "attention fla-gdn, fla-mom; mixed: aware, blind, aware+moe)"),
    "seq_lens": ("--seq-len", "ints", "sequence lengths, e.g. 64,128 (a grid with --num-kv-pairs)"),
    "num_kv_pairs": ("--num-kv-pairs", "ints", "key-value pair counts, e.g. 4,8,16"),
    "train_grid": ("--train-grid", "grid", "explicit training settings SEQxPAIRS, e.g. 64x4,256x64 (instead of "
                                           "--seq-len x --num-kv-pairs)"),
    "test_grid": ("--test-grid", "grid", "explicit tested settings SEQxPAIRS, e.g. 64x4,1024x256"),
    "data_style": ("--data-style", str, "MQAR data: memmix (the CPU demo's) or zoology (as Zoology's generator)"),
    "d_models": ("--d-model", "ints", "model widths, e.g. 64 (several: one row each)"),
    "num_layers": ("--layers", int, "layers per model"),
    "head_dim": ("--head-dim", int, "head size"),
    "steps": ("--steps", int, "training steps per model (the shared budget; the cap with --stop-accuracy)"),
    "lr": ("--lr", "floats", "peak learning rate; several (e.g. 1e-3,3.2e-3,1e-2): a sweep, the best on the "
                             "validation split is kept"),
    "batch_size": ("--batch-size", int, "training batch size"),
    "vocab_size": ("--vocab-size", int, "vocabulary size"),
    "num_train": ("--num-train", int, "training sequences per training set"),
    "num_valid": ("--num-valid", int, "validation sequences per trained setting (0: no validation split)"),
    "num_test": ("--num-test", int, "test sequences per (seq_len, num_kv_pairs)"),
    "seed": ("--seed", int, "seed of the data and the models"),
    "seeds": ("--seeds", int, "the best configuration of each (model, width) is trained with this many seeds"),
    "stop_accuracy": ("--stop-accuracy", float, "stop a run once its validation accuracy reaches this"),
    "eval_every": ("--eval-every", int, "steps between validation checks"),
    "log_every": ("--log-every", int, "steps between loss read-backs"),
    "budget_minutes": ("--budget-minutes", float, "start no new run after this many minutes (0: no limit); a "
                                                  "second call with the same --json continues"),
    "cuda_graph": ("--cuda-graph", str, "auto | on | off: each training step one captured CUDA graph (auto: on CUDA)"),
    "bf16": ("--bf16", str, "auto | on | off: bf16 autocast in training and evaluation, float32 weights and states "
                            "(auto: on CUDA)"),
    "query_head": ("--query-head", str, "auto | on | off: the LM head and loss at the query positions only "
                                        "(auto: on CUDA)"),
    "num_threads": ("--threads", int, "CPU threads per run (these tiny models gain little from more; "
                                      "0 = torch's default)"),
    "workers": ("--workers", int, "training runs at once, each in its own process (0: one per CPU core on the "
                                  "CPU, 1 on CUDA); the results do not depend on it"),
    "json_path": ("--json", str, "write all settings and results here, as each run finishes; an existing file of "
                                 "the same settings is continued"),
    "plot_path": ("--plot", str, "write a PNG of accuracy against num_kv_pairs (--task mqar)"),
    "state_plot_path": ("--state-plot", str, "write Zoology's plot: accuracy at the hardest trained setting against "
                                             "recurrent state size (--task mqar)"),
    "topks": ("--topk", "ints", "top-k values to compare, e.g. 1,2"),
    "num_segments": ("--num-segments", int, "segments per modality (they alternate)"),
}
_RECALL_FLAGS = {name: flag for name, (flag, _, _) in _RECALL_OPTIONS.items()}
# the options that size a recall grid's work: a grid too long for the CPU is blamed on those given
_RECALL_COST = ("models", "seq_lens", "num_kv_pairs", "train_grid", "test_grid", "d_models", "num_layers", "head_dim",
                "steps", "lr", "batch_size", "vocab_size", "num_train", "num_valid", "num_test", "seeds", "topks")


def _recall_modules():
    from memmix.evaluation import recall
    from memmix.evaluation.recall import mixed

    return recall, mixed


def _recall_help_notes() -> dict[str, str]:
    """'default: ...' for each recall option, read from the settings classes (imported only for --help)."""
    recall, mixed = _recall_modules()
    tasks = {"mqar": recall.RecallSettings(), "mixed": mixed.MixedRecallSettings()}
    notes = {}
    for name in _RECALL_OPTIONS:
        have = {task: getattr(s, name) for task, s in tasks.items() if hasattr(s, name)}
        values = {task: ",".join(map(str, v)) if isinstance(v, list) else str(v) for task, v in have.items()}
        if len(values) == 1:
            task, value = next(iter(values.items()))
            notes[name] = f"--task {task} only; default: {value}"
        elif len(set(values.values())) == 1:
            notes[name] = f"default: {values['mqar']}"
        else:
            notes[name] = "default: " + "; ".join(f"{v} ({t})" for t, v in values.items())
    notes["preset"] = f"--task mqar only; one of: {', '.join(recall.PRESETS)}"
    return notes


def _add_recall(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recall", help="MQAR associative-recall benchmark: train and compare models",
        description="Train several models on multi-query associative recall (MQAR) under one budget and print "
                    "their accuracy per (seq_len, num_kv_pairs). Options given override the preset.",
        lazy_defaults=_recall_help_notes)
    p.add_argument("--task", choices=["mqar", "mixed"], default="mqar",
                   help="mqar: compare models on MQAR; mixed: mixed-modal recall, modality-aware against "
                        "modality-blind memory routing (--models aware,blind[,aware+moe], --topk)")
    p.add_argument("--preset", default="default",
                   help="default: the CPU demo (about 9 min on 2 idle cores); cpu-vocab: does each recurrent model "
                        "learn MQAR at a larger vocabulary (CPU, about 15 min); zoology: the Zoology protocol, "
                        "zoology-d128: its d_model 128 answer with fla's reference rows, and zoology-ablations: "
                        "MoM's ablations on it (for a GPU: they refuse to start on the CPU without --force)")
    p.add_argument("--force", action="store_true", help="run a GPU-sized preset on the CPU anyway")
    for name, (flag, kind, help_text) in _RECALL_OPTIONS.items():
        if kind in ("names", "ints", "floats", "grid"):
            p.add_argument(flag, dest=name, nargs="+", metavar=flag.lstrip("-").upper(), help=help_text)
        elif name.endswith("_path"):
            p.add_argument(flag, dest=name, metavar="PATH", help=help_text)
        else:
            p.add_argument(flag, dest=name, type=kind, help=help_text)
    _add_device(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.set_defaults(run=_run_recall, prog=p.prog, flags=_RECALL_FLAGS)


def _recall_value(name: str, kind, raw):
    flag = _RECALL_FLAGS[name]
    if kind == "names":
        return [m.strip() for chunk in raw for m in chunk.split(",") if m.strip()]
    items = [x.strip() for chunk in raw for x in chunk.split(",") if x.strip()] if isinstance(raw, list) else []
    try:
        if kind == "ints":
            return [int(x) for x in items]
        if kind == "floats":
            values = [float(x) for x in items]
            return values[0] if len(values) == 1 else values
        if kind == "grid":
            grid = [tuple(int(v) for v in x.lower().split("x")) for x in items]
            if any(len(setting) != 2 for setting in grid):
                raise ValueError
            return grid
    except ValueError:
        what = {"ints": "integers", "floats": "numbers", "grid": "settings SEQxPAIRS (e.g. 64x4)"}[kind]
        raise InputError(f"expected {what} separated by commas, got {','.join(raw)}", argument=flag) from None
    return raw



def _recall_settings(args: argparse.Namespace, device: str):
    """The settings of --task from the preset, overridden by every option given; InputError names the option."""
    recall, mixed = _recall_modules()
    mqar = args.task == "mqar"
    if mqar and args.preset not in recall.PRESETS:
        close = difflib.get_close_matches(args.preset, list(recall.PRESETS), n=1)
        raise InputError(f"unknown preset {args.preset!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; allowed: {', '.join(recall.PRESETS)}", argument="--preset")
    if not mqar and args.preset != "default":
        raise InputError("applies to --task mqar only", argument="--preset")
    cls = recall.RecallSettings if mqar else mixed.MixedRecallSettings
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(recall.PRESETS[args.preset]) if mqar else {}
    values["device"] = device
    for name, (flag, kind, _) in _RECALL_OPTIONS.items():
        raw = getattr(args, name)
        if raw is None or (name == "json_path" and not mqar):  # mixed: the command writes the JSON itself
            continue
        if name not in fields:
            raise InputError(f"applies to --task {'mixed' if mqar else 'mqar'} only", argument=flag)
        values[name] = _recall_value(name, kind, raw)
    if mqar and values.get("train_grid") and values.get("test_grid"):  # both grids replace the seq_len x pairs
        for name in ("seq_lens", "num_kv_pairs"):  # product (with one grid, the other side still uses it)
            if getattr(args, name) is None:
                values[name] = []
    settings = cls(**values)
    try:
        (recall.validate_settings if mqar else mixed.validate_mixed_settings)(settings)
        if mqar:
            recall.check_resumable(settings)
    except recall.RecallSettingError as err:
        raise InputError(err.detail, argument=err.setting) from None
    return settings


def _check_cpu_grid(args: argparse.Namespace, settings, device) -> None:
    """A long recall grid: on the CPU, one estimated to take hours (GPU-sized) is refused without --force;
    otherwise a one-line warning with the estimate."""
    recall, _ = _recall_modules()
    warning = recall.preflight_warning(settings)
    if warning is None:
        return
    hours = recall.estimate_seconds(settings).seconds / 3600
    if device.type == "cpu" and hours > _CPU_RECALL_REFUSE_HOURS and not args.force:
        given = [flag for name, flag in _RECALL_FLAGS.items() if name in _RECALL_COST and getattr(args, name)]
        argument = given[0] if len(given) == 1 else None if given else "--preset"
        sizes = f" (with {', '.join(given)})" if len(given) > 1 else ""
        raise InputError(f"{warning}{sizes}; pass --device cuda on a GPU machine, or --force to run it here anyway",
                         argument=argument)
    print(f"{args.prog}: warning: {warning}", file=sys.stderr)


def _run_recall(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    for flag, path in (("--json", args.json_path), ("--plot", args.plot_path),
                       ("--state-plot", args.state_plot_path)):
        _check_output(flag, path)
    settings = _recall_settings(args, str(device))
    if not args.json_path:
        return _recall_report(args, settings, device)
    from memmix.files import exclusive_lock

    with exclusive_lock(args.json_path, "--json"):  # a second recall on the same --json would drop one's results
        return _recall_report(args, settings, device)


def _recall_report(args: argparse.Namespace, settings, device) -> int:
    recall, mixed = _recall_modules()
    if args.task == "mixed":
        from memmix.files import atomic_write_json

        report = mixed.run_mixed_recall(settings, progress=args.progress)
        print(mixed.format_mixed_table(report))
        written = True
        if args.json_path:
            written = _write_output(args.prog, "--json", args.json_path,
                                    lambda p: atomic_write_json(p, report.as_dict()))
        print(mixed.mixed_summary_line(report))
        return 0 if written else 1
    _check_cpu_grid(args, settings, device)
    report = recall.run_recall(settings, progress=args.progress)  # writes --json as runs finish, and the plots
    print(recall.format_table(report))
    for note in report.notes:
        print(f"{args.prog}: {note}", file=sys.stderr)
    failed = [note for note in report.notes if "could not write" in note]
    for path in (args.json_path, args.plot_path, args.state_plot_path):
        if path and os.path.exists(path) and not any(f"'{path}'" in note for note in failed):
            print(f"{args.prog}: wrote {path}", file=sys.stderr)
    print(recall.summary_line(report))
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- prepare


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="tokenise text into binary token shards for training",
        description="Tokenise documents (text files/folders, JSONL, a saved or hub dataset) into memory-mapped "
                    "token shards (*.mmtok) with checksummed headers.")
    p.add_argument("data", help="text file or folder, JSONL file, saved dataset folder, or hf:NAME")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--tokenizer", default="byte", help="'byte' (built in) or a local Hugging Face tokenizer folder")
    p.add_argument("--data-format", default="auto", choices=["auto", "text", "jsonl", "hf"], help="input format")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text")
    p.add_argument("--split", default="train", help="dataset split")
    p.add_argument("--doc-separator", default=None, help="split plain-text files into documents at this string")
    p.add_argument("--shard-tokens", type=_int_at_least(1), default=100_000_000,
                   help="tokens per shard (documents are not split)")
    _add_encoding_errors(p)
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(run=_run_prepare, prog=p.prog, flags={"out_dir": "--out", "data": "DATA"})


def _run_prepare(args: argparse.Namespace) -> int:
    from memmix.data.prepare import prepare_shards
    from memmix.data.sources import TextSource
    from memmix.data.shards import read_header
    from memmix.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    paths = prepare_shards(args.data, args.out, tokenizer, args.tokenizer, TextSource.of(args), args.shard_tokens,
                           args.overwrite, args.progress)
    tokens = sum(int(read_header(p)["num_tokens"]) for p in paths)
    print(f"wrote {len(paths)} shard(s), {tokens:,} tokens, to {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------- train


def _add_train(sub: argparse._SubParsersAction) -> None:
    from memmix.training.config import add_config_flags

    p = sub.add_parser(
        "train", help="train a language model (single GPU/CPU, or DDP/FSDP under torchrun)",
        description="Pre-train a MoM / GDN / Transformer language model. Settings: defaults < --config file < flags. "
                    "Multi-GPU: torchrun --nproc_per_node N -m memmix train ... --parallel ddp|fsdp")
    p.add_argument("--config", help="YAML or JSON file of settings (keys as the flags, '-' or '_')")
    add_config_flags(p)
    p.set_defaults(run=_run_train, prog=p.prog, flags={}, interrupted=_train_interrupted)


def _run_train(args: argparse.Namespace) -> int:
    from memmix.training.config import config_from_args

    config = config_from_args(args)  # checked before torch loads (seconds)
    args.out_dir = config.out_dir
    from memmix.training.trainer import train

    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.get("already_finished"):
        print(f"nothing to do: the run in {result['out_dir']} already finished at step {result['step']} "
              f"(--max-steps {config.max_steps}); raise --max-steps to train further")
    else:
        print(f"trained to step {result['step']}: loss {result['loss']:.4f}, {result['tokens']:,} tokens; "
              f"outputs in {result['out_dir']}")
    return 0


def _train_interrupted(args: argparse.Namespace) -> str:
    out_dir = getattr(args, "out_dir", None)
    if not out_dir or "memmix.training.checkpoint" not in sys.modules:  # interrupted before the settings were
        return ""  # read, or before torch loaded (importing it now could crash the half-imported torch)
    from memmix.training.checkpoint import CheckpointDir

    latest = CheckpointDir(out_dir).latest()
    if latest is None:
        return f"; no checkpoint was written to {out_dir} yet"
    return f"; the last checkpoint is {latest}: the same command with --resume continues from it"


# ----------------------------------------------------------------------------------------------- eval

_PPL_FLAGS = {"window": "--seq-len", "path": "--model"}


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model (perplexity, lm-evaluation-harness)",
                       description="Evaluate a trained model.")
    tasks = p.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    ppl = tasks.add_parser(
        "ppl", help="perplexity on held-out text",
        description="Perplexity of a checkpoint / run folder / saved model on held-out data; each document is "
                    "scored on its own (memories reset), in disjoint (chunked) or sliding windows.")
    ppl.add_argument("--model", required=True, help="step_*.pt checkpoint, a run's --out-dir, or a saved model folder")
    ppl.add_argument("--data", required=True, help="held-out text file/folder, JSONL, dataset or shards")
    ppl.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the model")
    ppl.add_argument("--data-format", default="auto", choices=["auto", "text", "jsonl", "hf", "shards"],
                     help="input format")
    ppl.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text")
    ppl.add_argument("--split", default="validation", help="dataset split (hf datasets)")
    ppl.add_argument("--doc-separator", default=None, help="split plain-text files into documents at this string")
    _add_encoding_errors(ppl)
    ppl.add_argument("--seq-len", type=_int_at_least(2), default=1024, help="window length")
    ppl.add_argument("--mode", choices=["chunked", "sliding"], default="chunked",
                     help="chunked: disjoint windows; sliding: overlapping windows --stride apart")
    ppl.add_argument("--stride", type=_int_at_least(1), default=None,
                     help="--mode sliding only: tokens between windows (default: seq_len/2)")
    ppl.add_argument("--tokens-per-batch", type=_int_at_least(1), default=16384,
                     help="tokens packed into one forward pass")
    _add_device(ppl)
    ppl.add_argument("--json", dest="json_path", metavar="PATH", help="also write the result here")
    ppl.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    ppl.set_defaults(run=_run_eval_ppl, prog=ppl.prog, flags=_PPL_FLAGS)
    lm = tasks.add_parser("lm-eval", add_help=False, passthrough=True,
                          help="lm-evaluation-harness with memmix registered (every argument goes to lm_eval)")
    lm.set_defaults(run=_run_lm_eval, prog=lm.prog, flags={})


def _run_lm_eval(args: argparse.Namespace) -> int:
    from memmix.evaluation.lm_eval import main as lm_eval_main

    return lm_eval_main(args.passthrough_args)


def _run_eval_ppl(args: argparse.Namespace) -> int:
    from memmix.evaluation.perplexity import check_perplexity_args

    check_perplexity_args(args.seq_len, args.stride, args.mode, args.tokens_per_batch)
    _check_output("--json", args.json_path)
    device = resolve_device(args.device)
    from memmix.files import check_outputs_apart

    check_outputs_apart({"--json": (args.json_path, False)},
                        {"--model": _model_input(args.model), "--data": args.data, "--tokenizer": args.tokenizer})

    from memmix.data.corpus import load_corpus
    from memmix.data.sources import TextSource
    from memmix.evaluation.loading import load_model_and_tokenizer
    from memmix.evaluation.perplexity import perplexity
    from memmix.files import atomic_write_json
    from memmix.progress import progress_bar

    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
    corpus = load_corpus(args.data, tokenizer, args.tokenizer or tokenizer.name, TextSource.of(args))
    bar = progress_bar(corpus.num_tokens, "perplexity", "tok", args.progress)
    result = perplexity(model, corpus.documents(), args.seq_len, args.stride, args.mode, args.tokens_per_batch,
                        device, progress=bar.update)
    bar.close()
    result.update(model=args.model, data=args.data, mode=args.mode, seq_len=args.seq_len)
    print(f"perplexity {result['ppl']:.4f} (nll {result['nll']:.4f} nats/token) over {result['tokens']:,} tokens "
          f"in {result['documents']} documents")
    if args.json_path and not _write_output(args.prog, "--json", args.json_path,
                                            lambda p: atomic_write_json(p, result)):
        return 1
    return 0


# ----------------------------------------------------------------------------------------------- generate


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a prompt (streams to stdout)",
        description="Sample a continuation of --prompt from a checkpoint, run folder or saved model folder, with "
                    "the model's own generate() (recurrent cache; CUDA-graph decoding on a GPU).")
    p.add_argument("--model", required=True, help="step_*.pt checkpoint, a run's --out-dir, or a saved model folder")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer saved with the model")
    _add_encoding_errors(p)
    _add_device(p)
    p.set_defaults(run=_run_generate, prog=p.prog, flags={"prompt": "--prompt", "path": "--model"})


def _run_generate(args: argparse.Namespace) -> int:
    from memmix.evaluation.generate import check_generate_args

    check_generate_args(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    prompt = _read_prompt(args.prompt, args.encoding_errors)
    if not prompt:
        raise InputError("the prompt is empty; pass some text (or '-' and text on stdin)", argument="prompt")
    device = resolve_device(args.device)

    from memmix.evaluation.generate import generate_text
    from memmix.evaluation.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    write(prompt)
    generate_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, write)
    write("\n")
    return 0


# ----------------------------------------------------------------------------------------------- convert


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a flash-linear-attention / official MoM checkpoint into a memmix model folder",
        description="Read an fla `MomForCausalLM` (or official OpenSparseLLMs/MoM) folder (config.json + weights) "
                    "and write a memmix save_pretrained folder (safetensors).")
    p.add_argument("src", help="fla / official MoM checkpoint folder")
    p.add_argument("dst", help="output folder")
    p.set_defaults(run=_run_convert, prog=p.prog, flags={})


def _run_convert(args: argparse.Namespace) -> int:
    if not os.path.isfile(os.path.join(args.src, "config.json")):
        raise InputError(f"'{args.src}' holds no config.json; pass an fla or official MoM checkpoint folder",
                         argument="SRC")
    _check_output("DST", args.dst, is_dir=True)
    from memmix.convert import convert_checkpoint

    try:
        model = convert_checkpoint(args.src, args.dst)
    except InputError:
        raise
    except ValueError as err:  # an option memmix does not reproduce, missing or misshapen weights
        raise InputError(f"cannot convert '{args.src}': {err}") from None
    print(f"wrote {args.dst}: {model.num_parameters():,} parameters")
    return 0


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memmix", description="Mixture-of-Memories models: train, evaluate, benchmark")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_recall, _add_prepare, _add_train, _add_eval, _add_generate, _add_convert):
        add(sub)
    return parser


def _message(err: Exception, flags: dict[str, str]) -> str:
    """The error's text, with the library argument it names shown as its command-line flag (as argparse does)."""
    argument = getattr(err, "argument", None)
    if not argument:
        return str(err)
    flag = argument if argument.startswith("-") or argument.isupper() else flags.get(
        argument, "--" + argument.replace("_", "-"))
    return f"argument {flag}: {err.detail}"


def _fail(prog: str, message: str, status: int):
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(status)


def _importing() -> bool:
    """Whether a module is being imported right now (its __spec__._initializing is set)."""
    return any(getattr(getattr(m, "__spec__", None), "_initializing", False) for m in list(sys.modules.values()))


def _on_sigint(prog: list[str]):
    """Ctrl-C: KeyboardInterrupt as usual, except inside an import (torch's takes seconds), where unwinding would
    leave a half-imported extension that crashes or prints a traceback on the way out: there the one line is
    printed and the process ends at once (nothing is being written during an import)."""

    def handler(signum, frame):
        if not _importing():
            raise KeyboardInterrupt
        os.write(2, f"{prog[0]}: interrupted\n".encode())
        os._exit(130)

    return handler


def main(argv: list[str] | None = None) -> int:
    import threading

    prog = ["memmix"]
    previous = signal.getsignal(signal.SIGINT)
    # leave a caller's own handler (or an ignored SIGINT) alone; handlers are the main thread's to set
    ours = previous is signal.default_int_handler and threading.current_thread() is threading.main_thread()
    if ours:
        signal.signal(signal.SIGINT, _on_sigint(prog))
    try:
        return _main(argv, prog)
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)


def _main(argv: list[str] | None, prog: list[str]) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        prog[0] = args.prog
        return int(args.run(args) or 0)
    except UsageError as err:
        _fail(err.prog, f"error: {err}", 2)
    except InputError as err:
        _fail(args.prog if args else "memmix", f"error: {_message(err, args.flags if args else {})}", 2)
    except KeyboardInterrupt as err:
        prog = args.prog if args else "memmix"
        try:
            note = args.interrupted(args) if args is not None and hasattr(args, "interrupted") else ""
        except Exception:  # the note is a courtesy; the interrupt is the news
            note = ""
        _fail(prog, "interrupted" + (f" ({err})" if str(err) else "") + note, 130)
    except BrokenPipeError:  # `memmix generate ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(141) from None


if __name__ == "__main__":
    sys.exit(main())
