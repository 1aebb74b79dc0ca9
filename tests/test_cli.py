"""The `memmix` command as a new user meets it: every bad input is one line and exit status 2 before any work starts,
Ctrl-C is one line and exit status 130, no work is lost."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cli_helpers import (PYTHON, RECALL_TINY, REPO, cli_error, folder_files, memmix_cli, must_not_start,
                         run, standin_train_argv)  # noqa: F401 (run: a fixture)
from training_helpers import TINY_MOM, write_corpus

from memmix.training.checkpoint import CheckpointDir
from memmix.training.metrics import read_metrics


@pytest.fixture
def a_file(tmp_path) -> str:
    """A regular file: a path below it cannot be created, even by root."""
    path = tmp_path / "plain_file"
    path.write_text("x")
    return str(path)


# ----------------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("command", ["eval", "generate", "train", "recall"])
def test_unavailable_or_unknown_device_is_one_line_in_every_command(command, run, tmp_path, capsys, monkeypatch):
    out_dir, held_out = run
    argv = {"eval": ["eval", "ppl", "--model", out_dir, "--data", held_out],
            "generate": ["generate", "--model", out_dir, "--prompt", "hi"],
            "train": standin_train_argv(write_corpus(tmp_path / "c.jsonl"), tmp_path / "r"),
            "recall": ["recall", *RECALL_TINY]}[command]
    line = cli_error(capsys, argv + ["--device", "tpu"])
    assert "error: argument --device: unknown device 'tpu'; allowed: auto, cpu, cuda, cuda:N" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    line = cli_error(capsys, argv + ["--device", "cuda"])
    assert "argument --device: 'cuda' requested but no CUDA GPU is visible" in line


# ----------------------------------------------------------------------------------------------- outputs


def test_unwritable_outputs_fail_before_the_work(run, tmp_path, a_file, capsys, monkeypatch):
    out_dir, held_out = run
    import memmix.evaluation.perplexity as ppl_lib
    import memmix.evaluation.recall as recall_lib

    monkeypatch.setattr(ppl_lib, "perplexity", must_not_start)
    monkeypatch.setattr(recall_lib, "run_recall", must_not_start)
    below = os.path.join(a_file, "out")
    corpus = write_corpus(tmp_path / "c.jsonl")
    cases = {"--json": ["eval", "ppl", "--model", out_dir, "--data", held_out, "--json", below + ".json"],
             "--out-dir": standin_train_argv(corpus, below),
             "--out": ["prepare", held_out, "--out", below],
             "--plot": ["recall", *RECALL_TINY, "--plot", below + ".png"],
             "DST": ["convert", os.path.join(out_dir, "final"), below]}
    cases["recall --json"] = ["recall", *RECALL_TINY, "--json", below + ".json"]
    for flag, argv in cases.items():
        line = cli_error(capsys, argv)
        assert f"argument {flag.split()[-1]}: '{a_file}' is not a folder" in line, line
    assert not os.path.exists(below)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_out_dir_fails_before_training(tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    line = cli_error(capsys, standin_train_argv(write_corpus(tmp_path / "c.jsonl"), tmp_path / "ro" / "run"))
    assert "argument --out-dir:" in line and "not writable" in line


def test_a_result_that_cannot_be_written_at_the_end_goes_to_a_fallback_file(run, tmp_path, capsys, monkeypatch):
    """The check passed, but the write failed after the work: the results are printed and saved elsewhere."""
    import memmix.files

    out_dir, held_out = run
    target = str(tmp_path / "ppl.json")
    write = memmix.files.atomic_write

    def refuse_target(path, *args, **kwargs):
        if os.fspath(path) == target:
            raise PermissionError(13, "Permission denied")
        return write(path, *args, **kwargs)

    monkeypatch.setattr(memmix.files, "atomic_write", refuse_target)
    code, out, err = memmix_cli(["eval", "ppl", "--model", out_dir, "--data", held_out, "--seq-len", "16", "--json",
                                 target, "--no-progress"], capsys)
    assert code == 1 and out.startswith("perplexity ")
    line = err.strip().splitlines()[-1]
    assert f"could not write --json '{target}' (Permission denied); wrote it to " in line
    fallback = line.rsplit(" to ", 1)[1].removesuffix(" instead")
    assert json.loads(open(fallback).read())["tokens"] > 0
    os.remove(fallback)


# ----------------------------------------------------------------------------------------------- Ctrl-C


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command, target", [
    ("prepare", "memmix.data.prepare.prepare_shards"), ("train", "memmix.training.trainer.train"),
    ("eval ppl", "memmix.evaluation.perplexity.perplexity"), ("generate", "memmix.evaluation.generate.generate_text"),
    ("recall", "memmix.evaluation.recall.run_recall"), ("convert", "memmix.convert.convert_checkpoint"),
    ("eval lm-eval", "memmix.evaluation.lm_eval.main")])
def test_ctrl_c_is_one_line_and_exit_130_in_every_command(command, target, run, tmp_path, capsys, monkeypatch):
    import importlib

    out_dir, held_out = run
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, _interrupt)
    argv = {"prepare": ["prepare", held_out, "--out", str(tmp_path / "s")],
            "train": standin_train_argv(write_corpus(tmp_path / "c.jsonl"), tmp_path / "r"),
            "eval ppl": ["eval", "ppl", "--model", out_dir, "--data", held_out, "--seq-len", "16"],
            "generate": ["generate", "--model", out_dir, "--prompt", "hi"],
            "recall": ["recall", *RECALL_TINY], "convert": ["convert", out_dir + "/final", str(tmp_path / "c")],
            "eval lm-eval": ["eval", "lm-eval", "--tasks", "x"]}[command]
    line = cli_error(capsys, argv, status=130)
    assert line.startswith(f"memmix {command}: interrupted")


def test_sigint_stops_a_training_run_with_one_line_and_no_cursor_codes_in_its_log(tmp_path):
    """A real Ctrl-C (SIGINT) on `python -m memmix train`; stderr is a pipe, so the progress shows as plain lines."""
    corpus = write_corpus(tmp_path / "c.jsonl", num_docs=200)
    out_dir = tmp_path / "run"
    proc = subprocess.Popen([PYTHON, "-m", "memmix", "train", "--model", "tiny", "--model-overrides",
                             json.dumps(TINY_MOM), "--data", corpus, "--seq-len", "16", "--micro-batch-size", "1",
                             "--max-steps", "100000", "--save-every", "1", "--log-every", "1", "--out-dir",
                             str(out_dir), "--no-tensorboard"], cwd=tmp_path, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    deadline = time.monotonic() + 300
    while not (out_dir / "checkpoints" / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("memmix train: interrupted; the last checkpoint is ") and "--resume continues" in last
    assert "Traceback" not in err and "\x1b[" not in err and "\r" not in err
    assert CheckpointDir(str(out_dir)).latest() in last


# ----------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("name, content, offset", [("bad.txt", b"fine text\n\xff\xfe more", 10),
                                                   ("bad.jsonl", b'{"text": "ok"}\n{"text": "x\xc3"}\n', 26)])
def test_bytes_that_are_not_utf8_are_one_error_in_every_format(name, content, offset, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    for argv in (["prepare", str(path), "--out", str(tmp_path / "s")],
                 ["prepare", str(path), "--out", str(tmp_path / "s"), "--data-format",
                  "jsonl" if name.endswith("jsonl") else "text"]):
        line = cli_error(capsys, argv)
        assert f"'{path}'" in line and f"is not valid UTF-8 at byte {offset}" in line and "replace" in line
    assert memmix_cli(["prepare", str(path), "--out", str(tmp_path / "s"), "--encoding-errors", "replace",
                       "--no-progress"], capsys)[0] == 0


def test_binary_stdin_prompt_is_an_error_before_loading(run, capsys, monkeypatch):
    import memmix.evaluation.loading as loading

    monkeypatch.setattr(loading, "load_model_and_tokenizer", must_not_start)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xff\xfe")))
    line = cli_error(capsys, ["generate", "--model", run[0], "--prompt", "-"])
    assert "argument --encoding-errors: stdin is not valid UTF-8 at byte 3" in line


def test_replace_policy_generates_from_a_binary_prompt(run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xff")))
    code, out, _ = memmix_cli(["generate", "--model", run[0], "--prompt", "-", "--encoding-errors", "replace",
                               "--max-new-tokens", "3", "--temperature", "0"], capsys)
    assert code == 0 and out.startswith("ok \ufffd")


# ----------------------------------------------------------------------------------------------- shards


def test_damaged_unverified_shards_give_the_verified_path_s_error(tmp_path, capsys):
    from memmix.data.shards import HEADER_BYTES

    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    assert memmix_cli(["prepare", str(text), "--out", str(tmp_path / "s"), "--no-progress"], capsys)[0] == 0
    shard = tmp_path / "s" / "shard_00000.mmtok"
    with open(shard, "r+b") as f:
        for position in range(0, 1700, 8):  # a token id 65535 in every row of 16
            f.seek(HEADER_BYTES + 2 * position)
            f.write(b"\xff\xff")
    argv = standin_train_argv(str(tmp_path / "s"), tmp_path / "r")
    assert "has corrupt tokens (checksum mismatch); delete" in cli_error(capsys, argv)
    line = cli_error(capsys, argv + ["--no-verify-shards"])
    assert f"shard '{shard}' has corrupt tokens: token " in line and "is id 65535, outside the vocabulary" in line
    assert "re-run `memmix prepare`" in line


# ----------------------------------------------------------------------------------------------- overrides


def test_unknown_model_override_is_refused_with_did_you_mean(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    base = ["train", "--model", "tiny", "--data", corpus, "--out-dir", str(tmp_path / "r"), "--max-steps", "1",
            "--seq-len", "16", "--no-progress"]
    line = cli_error(capsys, base + ["--model-overrides", '{"num_memoriez": 4}'])
    assert line.endswith("argument --model-overrides: unknown MoMConfig field 'num_memoriez' (did you mean "
                         "'num_memories'?)")
    (tmp_path / "run.yaml").write_text("model: bmojo-tiny\nmodel_overrides: {window_sise: 8}\n")
    line = cli_error(capsys, ["train", "--config", str(tmp_path / "run.yaml"), "--data", corpus, "--out-dir",
                              str(tmp_path / "r")])
    assert "unknown BMojoConfig field 'window_sise' (did you mean 'window_size'?)" in line
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------- resume


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    assert memmix_cli(standin_train_argv(corpus, tmp_path / "r"), capsys)[0] == 0
    before = folder_files(tmp_path / "r")
    code, out, _ = memmix_cli(standin_train_argv(corpus, tmp_path / "r", "--resume", "--seq-len", "32"), capsys)
    assert code == 0 and out.startswith(f"nothing to do: the run in {tmp_path / 'r'} already finished at step 2")
    assert folder_files(tmp_path / "r") == before


def test_resume_refuses_a_new_data_stream_and_records_new_optimiser_settings(tmp_path, capsys):
    from memmix.training.checkpoint import load_checkpoint
    from memmix.training.optim import cosine_schedule

    corpus = write_corpus(tmp_path / "c.jsonl")
    run_dir = tmp_path / "r"
    assert memmix_cli(standin_train_argv(corpus, run_dir), capsys)[0] == 0
    before = folder_files(run_dir)
    line = cli_error(capsys, standin_train_argv(corpus, run_dir, "--resume", "--max-steps", "4", "--seq-len", "32"))
    assert "argument --seq-len: is 32 but the run in checkpoint" in line and "trained with 16" in line
    assert folder_files(run_dir) == before

    code, _, err = memmix_cli(standin_train_argv(corpus, run_dir, "--resume", "--max-steps", "4", "--lr", "6e-3",
                                                 "--weight-decay", "0.05"), capsys)
    assert code == 0
    assert "warning: resuming with lr=0.006; the run trained with lr=0.003 until step 2" in err
    start = read_metrics(str(run_dir), "start")[-1]
    assert start["changed_settings"] == {"lr": [3e-3, 6e-3], "max_steps": [2, 4], "weight_decay": [0.1, 0.05]}
    schedule = cosine_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=6e-3), 1, 4, 0.1)
    expected_lr = 6e-3 * schedule.lr_lambdas[0](2)  # step 3 runs with the schedule after 2 steps
    assert read_metrics(str(run_dir))[2]["lr"] == pytest.approx(expected_lr)
    groups = load_checkpoint(CheckpointDir(str(run_dir)).latest())["optimizer"]["param_groups"]
    assert max(g["weight_decay"] for g in groups) == 0.05
    assert json.loads((run_dir / "train_config.json").read_text())["lr"] == 6e-3


# ----------------------------------------------------------------------------------------------- --resume PATH


def test_a_damaged_latest_checkpoint_names_an_older_one_that_resume_path_takes(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    six = ["--max-steps", "6", "--save-every", "2"]
    assert memmix_cli(standin_train_argv(corpus, tmp_path / "full", *six), capsys)[0] == 0
    assert memmix_cli(standin_train_argv(corpus, tmp_path / "r", "--max-steps", "4"), capsys)[0] == 0
    ckpts = CheckpointDir(str(tmp_path / "r"))
    latest, older = ckpts.latest(), ckpts.path_for(2)
    os.truncate(latest, 64)
    line = cli_error(capsys, standin_train_argv(corpus, tmp_path / "r", *six, "--resume"))
    assert f"argument --resume: checkpoint '{latest}' could not be read" in line
    assert line.endswith(f"pass an older one: {older}")
    assert memmix_cli(standin_train_argv(corpus, tmp_path / "r", *six, "--resume", older), capsys)[0] == 0
    curve = [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "r"))]
    assert curve == [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "full"))]


# ----------------------------------------------------------------------------------------------- ignored args


def test_arguments_that_would_be_ignored_are_errors_or_warnings(run, tmp_path, capsys, monkeypatch):
    out_dir, held_out = run
    ppl = ["eval", "ppl", "--model", out_dir, "--data", held_out]
    assert "argument --stride: must be >= 1, got 0" in cli_error(capsys, ppl + ["--mode", "sliding", "--stride", "0"])
    assert "argument --tokens-per-batch: must be >= 1, got 0" in cli_error(capsys, ppl + ["--tokens-per-batch", "0"])
    assert "argument --stride: applies to mode 'sliding' only" in cli_error(capsys, ppl + ["--stride", "4"])
    corpus = write_corpus(tmp_path / "c.jsonl")
    line = cli_error(capsys, standin_train_argv(corpus, tmp_path / "a", "--eval-every", "2"))
    assert "argument --eval-every: is 2 but there is no validation data" in line
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    line = cli_error(capsys, standin_train_argv(corpus, tmp_path / "b", "--parallel", "ddp"))
    assert "argument --parallel: 'ddp' needs the processes that torchrun starts" in line
    code, _, err = memmix_cli(standin_train_argv(corpus, tmp_path / "c", "--val-data", held_out), capsys)
    assert code == 0 and "warning: val_data is set but eval_every is 0, so it is never evaluated" in err


# ----------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "argument --temperature: must be >= 0"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0.0"),
    (["--top-p", "2"], "argument --top-p: must be in (0, 1], got 2.0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1")])
def test_generate_checks_its_arguments_before_loading_or_echoing(argv, message, run, capsys, monkeypatch):
    import memmix.evaluation.loading as loading

    monkeypatch.setattr(loading, "load_model_and_tokenizer", must_not_start)
    code, out, err = memmix_cli(["generate", "--model", run[0], "--prompt", "hello", *argv], capsys)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------- recall


def test_recall_refuses_unknown_options_and_gpu_presets_on_the_cpu(capsys, monkeypatch):
    import memmix.evaluation.recall as recall_lib

    assert cli_error(capsys, ["recall", "--bogus"]) == \
        "memmix recall: error: unknown option '--bogus'; see `memmix recall --help`"
    assert "unknown option '--stesp' (did you mean --steps?)" in cli_error(capsys, ["recall", "--stesp", "5"])
    monkeypatch.setattr(recall_lib, "run_recall", must_not_start)
    line = cli_error(capsys, ["recall", "--preset", "zoology", "--device", "cpu"])
    assert "argument --preset: this grid takes" in line and "use --device cuda" in line and "--force" in line
    assert "unknown preset 'paper'" in cli_error(capsys, ["recall", "--preset", "paper"])  # renamed zoology
    monkeypatch.setattr(recall_lib, "run_recall", _interrupt)  # it starts: interrupt it at once
    code, _, err = memmix_cli(["recall", "--preset", "zoology", "--device", "cpu", "--force"], capsys)
    assert code == 130 and "warning: this grid takes" in err


def test_recall_options_of_the_other_task_are_refused(capsys):
    assert "argument --topk: applies to --task mixed only" in cli_error(capsys, ["recall", "--topk", "2"])
    assert "argument --workers: applies to --task mqar only" in cli_error(
        capsys, ["recall", "--task", "mixed", "--workers", "2"])


# ----------------------------------------------------------------------------------------------- what users expect


def test_help_shows_defaults(capsys):
    for argv, expected in ((["train", "--help"], ["tokens per row (default: 512)", "(default: --shuffle)"]),
                           (["eval", "ppl", "--help"], ["window length (default: 1024)"]),
                           (["generate", "--help"], ["0 = greedy (default: 0.8)"]),
                           (["recall", "--help"], ["--stop-accuracy) (default: 4500", "--task mixed only"])):
        code, out, _ = memmix_cli(argv, capsys)
        text = " ".join(out.split())
        assert code == 0 and all(e in text for e in expected), (argv, text)


def _fresh(code: str) -> str:
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    code = ("import sys\nfrom memmix.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['generate', '--model', 'm', '--prompt', 'p', "
            "'--temperature', 'x'], ['eval', 'ppl', '--model', 'm', '--data', 'd', '--stride', '0'], "
            "['recall', '--bogus'], ['train', '--seq-len', 'x']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert _fresh(code).splitlines()[-1] == "[]"


def test_import_memmix_registers_the_auto_classes_in_either_import_order():
    check = ("from transformers import AutoConfig\n"
             "print(type(AutoConfig.for_model('memmix_mom')).__name__, type(AutoConfig.for_model('memmix_bmojo')).__name__)")
    lazy = "print(memmix.MoMConfig.__name__, memmix.ops.gated_delta_rule.__name__)"
    assert _fresh("import sys, memmix\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
                  + check + "\n" + lazy).splitlines() == ["MoMConfig BMojoConfig", "MoMConfig gated_delta_rule"]
    assert _fresh("import transformers, memmix\n" + check) == "MoMConfig BMojoConfig"


def test_python_dash_m_memmix_runs_the_command():
    ok = subprocess.run([PYTHON, "-m", "memmix", "recall", "--help"], capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=REPO))
    bad = subprocess.run([PYTHON, "-m", "memmix", "recall", "--bogus"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert ok.returncode == 0 and "--num-kv-pairs" in ok.stdout
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "memmix recall: error: unknown option '--bogus'; see `memmix recall --help`"


def test_train_prints_validation_and_draws_the_loss_curve(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "c.jsonl")
    argv = standin_train_argv(corpus, tmp_path / "r", "--val-data", corpus, "--eval-every", "1", "--plot")
    code, _, err = memmix_cli(argv, capsys)
    assert code == 0 and "step 1: validation loss " in err and "step 2: validation loss " in err
    assert (tmp_path / "r" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import -> ImportError
    code, _, err = memmix_cli(standin_train_argv(corpus, tmp_path / "s", "--plot"), capsys)
    assert code == 0 and not (tmp_path / "s" / "loss.png").exists()
    assert [line for line in err.splitlines() if "matplotlib" in line] == [
        "memmix train: matplotlib is not installed, so there is no loss.png (pip install matplotlib)"]


def test_progress_in_a_file_is_plain_lines(run, capsys):
    from memmix.progress import progress_bar

    sink = io.StringIO()
    bar = progress_bar(20, "work", "step", file=sink)
    for _ in range(20):
        bar.set_postfix(loss="1.0")
        bar.update(1)
    bar.write("a note")
    bar.close()
    lines = sink.getvalue().splitlines()
    assert len(lines) == 11 and lines[-2].startswith("work: 20/20 step (100%)") and lines[-1] == "a note"
    assert "\r" not in sink.getvalue() and "\x1b" not in sink.getvalue()
    code, out, err = memmix_cli(["eval", "ppl", "--model", run[0], "--data", run[1], "--seq-len", "16"], capsys)
    tokens = len(open(run[1], "rb").read()) + 1  # bytes + the end-of-document token
    assert code == 0 and err.splitlines()[-1].startswith(f"perplexity: {tokens}/{tokens} tok (100%)")


def test_recall_protocol_options_reach_the_settings(capsys, monkeypatch):
    import memmix.evaluation.recall as recall_lib

    seen = {}

    def capture(settings, progress=True):
        seen["settings"] = settings
        raise KeyboardInterrupt

    monkeypatch.setattr(recall_lib, "run_recall", capture)
    code, _, _ = memmix_cli(["recall", "--train-grid", "32x2,32x4", "--test-grid", "32x2", "--lr", "1e-3,3e-3",
                             "--num-valid", "20", "--seeds", "2", "--stop-accuracy", "0.9", "--cuda-graph", "off",
                             "--query-head", "on", "--data-style", "zoology", "--budget-minutes", "5", "--device",
                             "cpu"], capsys)
    s = seen["settings"]
    assert code == 130
    assert s.train_grid == [(32, 2), (32, 4)] and s.test_grid == [(32, 2)] and s.lr == [1e-3, 3e-3]
    assert (s.num_valid, s.seeds, s.stop_accuracy, s.cuda_graph, s.query_head, s.data_style, s.budget_minutes) == (
        20, 2, 0.9, "off", "on", "zoology", 5.0)
    assert "argument --train-grid: expected settings SEQxPAIRS" in cli_error(capsys, ["recall", "--train-grid", "64-4"])
    # one grid: tests the product
    code, _, _ = memmix_cli(["recall", "--train-grid", "32x4", "--device", "cpu"], capsys)
    assert code == 130 and seen["settings"].train_grid == [(32, 4)] and seen["settings"].seq_lens == [32]
    assert "argument --cuda-graph: 'on' needs a CUDA device" in cli_error(
        capsys, ["recall", "--cuda-graph", "on", "--device", "cpu"])
    assert "argument --query-head: must be one of auto, on, off" in cli_error(capsys, ["recall", "--query-head", "x"])
