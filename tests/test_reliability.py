"""Nothing a user gives memmix destroys their data, crashes it, or passes silently: outputs that are inputs, interrupted
or failed writes, locks, bad data and settings; inputs that once ended in a traceback; error messages that blame the
right thing; the Python API's checks of its arguments (`test_api_...`)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import time

import numpy as np
import pytest
import torch

from cli_helpers import (PYTHON, RECALL_TINY, REPO, cli_error, folder_files, memmix_cli, must_not_start,
                         run, standin_train_argv)  # noqa: F401 (run: a fixture)
from training_helpers import TINY_MOM, tiny_train_config, write_corpus

from memmix.training.checkpoint import CheckpointDir
from memmix.training.metrics import read_metrics

ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
RECALL_IN_PROCESS = [*RECALL_TINY, "--workers", "1"]  # one worker: the runs stay where monkeypatch reaches them


def _text_corpus(folder, num_docs: int = 60, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_docs):
        words = rng.choice(["cat", "sat", "mat", "dog", "ran", "park"], size=int(rng.integers(20, 60)))
        (folder / f"doc_{i:03d}.txt").write_text(" ".join(words) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------- outputs


def test_eval_json_equal_to_an_input_is_refused_before_the_work(run, tmp_path, capsys, monkeypatch):
    import memmix.evaluation.perplexity as ppl_lib

    out_dir, held_out = run
    monkeypatch.setattr(ppl_lib, "perplexity", must_not_start)
    data = tmp_path / "held.txt"
    shutil.copy(held_out, data)
    before = data.read_bytes()
    line = cli_error(capsys, ["eval", "ppl", "--model", out_dir, "--data", data, "--json", data])
    assert f"argument --json: '{data}' is also the input --data" in line
    assert data.read_bytes() == before
    checkpoint = CheckpointDir(out_dir).latest()
    saved = open(checkpoint, "rb").read()
    for model in (checkpoint, out_dir):  # the checkpoint itself, or the run folder whose latest it is
        line = cli_error(capsys, ["eval", "ppl", "--model", model, "--data", held_out, "--json", checkpoint])
        assert "argument --json:" in line and "is also the input --model" in line
    assert open(checkpoint, "rb").read() == saved
    final = os.path.join(out_dir, "final")
    line = cli_error(capsys, ["eval", "ppl", "--model", final, "--data", held_out, "--json",
                              os.path.join(final, "config.json")])
    assert "lies inside the input --model" in line


def test_an_output_equal_to_an_input_is_refused_in_every_command(run, tmp_path, capsys, monkeypatch):
    import memmix.convert
    import memmix.data.prepare
    import memmix.training.trainer as trainer

    out_dir, held_out = run
    monkeypatch.setattr(trainer, "build_model", must_not_start)
    monkeypatch.setattr(memmix.data.prepare, "iter_documents", must_not_start)
    monkeypatch.setattr(memmix.convert, "load_state_dict", must_not_start)
    texts = _text_corpus(tmp_path / "texts", num_docs=3)
    before = folder_files(texts)
    final = os.path.join(out_dir, "final")
    cases = {
        "prepare --out": (["prepare", texts, "--out", texts], "argument --out: "),
        "prepare --out holding DATA": (["prepare", texts / "doc_000.txt", "--out", texts], "argument --out: "),
        "train --out-dir": (standin_train_argv(texts, texts), "argument --out-dir: "),
        "train --out-dir in --data": (standin_train_argv(texts, texts / "run"), "argument --out-dir: "),
        "convert": (["convert", final, final], "argument DST: "),
    }
    for name, (argv, flag) in cases.items():
        line = cli_error(capsys, argv)
        assert flag in line and ("is also the input" in line or "the input" in line), (name, line)
    assert folder_files(texts) == before


# ----------------------------------------------------------------------------------------------- convert


def test_convert_into_its_source_is_refused_and_the_source_is_kept(run, capsys):
    final = os.path.join(run[0], "final")
    before = folder_files(final)
    line = cli_error(capsys, ["convert", final, final])
    assert f"argument DST: '{final}' is also the input SRC" in line
    line = cli_error(capsys, ["convert", final, os.path.join(final, "sub")])
    assert "lies inside the input SRC" in line
    assert folder_files(final) == before


def _fla_checkpoint(folder) -> str:
    """A tiny fla MomForCausalLM folder (config.json + model.safetensors), built from our own model's weights."""
    from safetensors.torch import save_file

    from memmix.models import MoMConfig, MoMForCausalLM

    config = {"model_type": "mom", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2,
              "head_dim": 16, "num_memories": 2, "topk": 1, "intermediate_size": 64, "tie_word_embeddings": False}
    model = MoMForCausalLM(MoMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2, head_dim=16,
                                     num_memories=2, topk=1, intermediate_size=64, shared_mem=True,
                                     tie_word_embeddings=False))
    state = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if len(parts) > 3 and parts[-2] == "attn" and parts[-1] in ("k_proj", "v_proj", "b_proj", "a_proj"):
            rows = list(tensor)
            prefix = ".".join(parts[:-1]) + "."
            for i, row in enumerate(rows[:-1]):
                state[f"{prefix}{parts[-1]}.{i}.weight"] = row.clone()
            state[f"{prefix}shared_{parts[-1][0]}.weight"] = rows[-1].clone()
        else:
            state[key] = tensor.clone()
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    return str(folder)


def test_convert_replaces_a_model_folder_whole_and_refuses_other_files(tmp_path, capsys):
    src = _fla_checkpoint(tmp_path / "fla")
    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    line = cli_error(capsys, ["convert", src, dst])
    assert "argument DST:" in line and "holds other files" in line and (dst / "notes.txt").exists()
    (dst / "notes.txt").unlink()
    assert memmix_cli(["convert", src, dst], capsys)[0] == 0
    (dst / "stale.bin").write_bytes(b"old")  # a file of the folder it replaces
    assert memmix_cli(["convert", src, dst], capsys)[0] == 0
    assert not (dst / "stale.bin").exists() and (dst / "model.safetensors").exists()


# -------------------------------------------------------------------------------------- prepare, and interrupted writes


def _prepare(data, out, *extra) -> list[str]:
    return ["prepare", str(data), "--out", str(out), "--shard-tokens", "300", "--no-progress", *extra]


def _stop_after(monkeypatch, documents: int, error: BaseException):
    """Make the tokenizer raise `error` at its `documents`-th document (a Ctrl-C or a failure mid-run)."""
    from memmix.data.tokenizer import ByteTokenizer

    encode, seen = ByteTokenizer.encode, []

    def failing(self, text):
        seen.append(1)
        if len(seen) == documents:
            raise error
        return encode(self, text)

    monkeypatch.setattr(ByteTokenizer, "encode", failing)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_an_interrupted_or_failed_overwrite_leaves_the_old_shards(error, tmp_path, capsys, monkeypatch):
    old, new = _text_corpus(tmp_path / "old", 30, seed=1), _text_corpus(tmp_path / "new", 60, seed=2)
    out = tmp_path / "shards"
    assert memmix_cli(_prepare(old, out), capsys)[0] == 0
    before = folder_files(out)
    assert len([n for n in before if n.endswith(".mmtok")]) > 2
    _stop_after(monkeypatch, 45, error)
    code, _, err = memmix_cli(_prepare(new, out, "--overwrite"), capsys)
    assert code == (130 if isinstance(error, KeyboardInterrupt) else 2) and len(err.strip().splitlines()) == 1, err
    assert folder_files(out) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".shards.")]  # no staging folder left


def test_a_utf8_error_in_the_middle_leaves_the_old_shards(tmp_path, capsys):
    old, new = _text_corpus(tmp_path / "old", 30, seed=1), _text_corpus(tmp_path / "new", 60, seed=2)
    (new / "doc_040.txt").write_bytes(b"fine \xff\xfe broken")
    out = tmp_path / "shards"
    assert memmix_cli(_prepare(old, out), capsys)[0] == 0
    before = folder_files(out)
    line = cli_error(capsys, _prepare(new, out, "--overwrite"))
    assert "is not valid UTF-8" in line
    assert folder_files(out) == before


def test_an_interrupted_fresh_run_leaves_no_folder(tmp_path, capsys, monkeypatch):
    data = _text_corpus(tmp_path / "texts", 60)
    _stop_after(monkeypatch, 40, KeyboardInterrupt())
    assert memmix_cli(_prepare(data, tmp_path / "shards"), capsys)[0] == 130
    assert not (tmp_path / "shards").exists()


def test_readers_refuse_a_folder_without_its_completion_record(tmp_path, capsys):
    from memmix.data.shards import RECORD_NAME

    data = _text_corpus(tmp_path / "texts", 30)
    out = tmp_path / "shards"
    assert memmix_cli(_prepare(data, out), capsys)[0] == 0
    record = json.loads((out / RECORD_NAME).read_text())
    assert [s["name"] for s in record["shards"]] == sorted(n for n in os.listdir(out) if n.endswith(".mmtok"))
    (out / RECORD_NAME).write_text(json.dumps(dict(record, format="something-else")))  # not our record
    line = cli_error(capsys, standin_train_argv(out, tmp_path / "r0"))
    assert f"the completion record '{out / RECORD_NAME}' is damaged" in line
    (out / RECORD_NAME).write_text(json.dumps(record))
    (out / "shard_00001.mmtok").unlink()  # a folder that lost a shard
    line = cli_error(capsys, standin_train_argv(out, tmp_path / "r1"))
    assert f"the shards in '{out}' are not the ones `memmix prepare` wrote" in line and "is missing" in line
    (out / RECORD_NAME).unlink()  # an interrupted (or older) prepare: no record
    line = cli_error(capsys, standin_train_argv(out, tmp_path / "r2"))
    assert f"'{out}' holds shards but no completion record (prepared.json)" in line
    assert "re-run `memmix prepare`" in line


def test_prepare_refuses_an_out_folder_of_other_files(tmp_path, capsys):
    data = _text_corpus(tmp_path / "texts", 5)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    line = cli_error(capsys, _prepare(data, out, "--overwrite"))
    assert "argument --out:" in line and "holds other files (e.g. 'thesis.tex')" in line
    assert (out / "thesis.tex").read_text() == "do not delete"


def _old_or_complete_new(out, before: dict, expected_tokens: int) -> str:
    """'old' or 'new' (complete, readable); fails on anything else."""
    from memmix.data.shards import open_shards

    if not os.path.exists(out):
        return "none"
    if folder_files(out) == before:
        return "old"
    shards = open_shards(str(out))
    assert sum(int(s.meta["num_tokens"]) for s in shards) == expected_tokens
    return "new"


def _kill_at(argv, sig, delay: float) -> str:
    """Start `python -m memmix argv`, send `sig` after `delay` seconds (or let it finish); its stderr."""
    proc = subprocess.Popen([PYTHON, "-m", "memmix", *map(str, argv)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    # -SIGINT: the signal came after main() returned, while the interpreter was exiting (the work was done)
    assert "Traceback" not in err and proc.returncode in (0, 130, -signal.SIGKILL, -signal.SIGINT), (
        proc.returncode, err[-2000:])
    return err


INTERRUPTS = [(signal.SIGKILL, 1.0), (signal.SIGINT, 1.4)]  # the default run; the slow run tries more moments
MORE_INTERRUPTS = [(sig, delay) for sig in (signal.SIGINT, signal.SIGKILL) for delay in (0.3, 0.7, 1.2, 2.0, 3.0)]


def _prepare_killed(tmp_path, capsys, moments):
    old, new = _text_corpus(tmp_path / "old", 20, seed=1), _text_corpus(tmp_path / "new", 400, seed=2)
    out, reference = tmp_path / "shards", tmp_path / "reference"
    assert memmix_cli(_prepare(old, out), capsys)[0] == 0
    assert memmix_cli(_prepare(new, reference, "--shard-tokens", "100"), capsys)[0] == 0
    expected = sum(int(s["num_tokens"]) for s in json.loads((reference / "prepared.json").read_text())["shards"])
    before = folder_files(out)
    for sig, delay in moments:
        _kill_at(_prepare(new, out, "--overwrite", "--shard-tokens", "100"), sig, delay)
        state = _old_or_complete_new(out, before, expected)
        assert state in ("old", "new"), (sig, delay, state)
        if state == "new":  # start again from the old folder
            shutil.rmtree(out)
            assert memmix_cli(_prepare(old, out), capsys)[0] == 0
            before = folder_files(out)


def test_prepare_interrupted_at_two_moments_leaves_the_old_or_the_complete_new_folder(tmp_path, capsys):
    _prepare_killed(tmp_path, capsys, INTERRUPTS)


@pytest.mark.slow
def test_prepare_interrupted_at_many_moments_leaves_the_old_or_the_complete_new_folder(tmp_path, capsys):
    _prepare_killed(tmp_path, capsys, MORE_INTERRUPTS)


def _convert_killed(tmp_path, capsys, moments):
    from memmix.models import MoMForCausalLM

    old_src, new_src = _fla_checkpoint(tmp_path / "a"), _fla_checkpoint(tmp_path / "b")
    dst, reference = tmp_path / "dst", tmp_path / "reference"
    assert memmix_cli(["convert", new_src, reference], capsys)[0] == 0
    expected = MoMForCausalLM.from_pretrained(reference).state_dict()
    for sig, delay in moments:
        shutil.rmtree(dst, ignore_errors=True)
        assert memmix_cli(["convert", old_src, dst], capsys)[0] == 0
        before = folder_files(dst)
        _kill_at(["convert", new_src, dst], sig, delay)
        if folder_files(dst) != before:  # the complete new folder
            state = MoMForCausalLM.from_pretrained(dst).state_dict()
            assert all(torch.equal(state[k], expected[k]) for k in expected)
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".dst.")], os.listdir(tmp_path)


def test_convert_interrupted_at_two_moments_leaves_the_old_or_the_complete_new_folder(tmp_path, capsys):
    _convert_killed(tmp_path, capsys, [(signal.SIGKILL, 2.5), (signal.SIGINT, 4.0)])


@pytest.mark.slow
def test_convert_interrupted_at_many_moments_leaves_the_old_or_the_complete_new_folder(tmp_path, capsys):
    _convert_killed(tmp_path, capsys, [(sig, d) for sig in (signal.SIGINT, signal.SIGKILL) for d in (1, 3, 4, 5, 6)])


def _train_killed(tmp_path, moments):
    from memmix.training.checkpoint import load_checkpoint

    corpus = write_corpus(tmp_path / "c.jsonl", num_docs=200)
    out_dir = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--model-overrides", json.dumps(TINY_MOM), "--data", corpus, "--seq-len",
            "16", "--max-steps", "12", "--save-every", "1", "--log-every", "1", "--out-dir", out_dir,
            "--no-tensorboard", "--no-progress", "--no-plot"]
    for sig, delay in moments:
        latest = CheckpointDir(str(out_dir)).latest()
        _kill_at(argv + (["--resume"] if latest else []), sig, delay)
        latest = CheckpointDir(str(out_dir)).latest()
        if latest is not None:  # every checkpoint there is whole, and the log holds each step once
            step = load_checkpoint(latest)["step"]
            steps = [r["step"] for r in read_metrics(str(out_dir))]
            assert steps == sorted(set(steps)) and steps[: step] == list(range(1, step + 1))
        if (out_dir / "final").exists():
            assert (out_dir / "final" / "model.safetensors").exists() and (out_dir / "final" / "config.json").exists()


def test_train_interrupted_at_two_moments_leaves_whole_checkpoints(tmp_path):
    _train_killed(tmp_path, [(signal.SIGKILL, 6.0), (signal.SIGINT, 7.0)])


@pytest.mark.slow
def test_train_interrupted_at_many_moments_leaves_whole_checkpoints(tmp_path):
    _train_killed(tmp_path, [(sig, d) for d in (2, 5, 6, 7, 8, 10) for sig in (signal.SIGINT, signal.SIGKILL)])


# ----------------------------------------------------------------------------------------------- locks


def test_a_second_train_into_a_busy_out_dir_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    from memmix.files import exclusive_lock

    import memmix.training.trainer as trainer

    corpus = write_corpus(tmp_path / "c.jsonl")
    with exclusive_lock(tmp_path / "r", "out_dir", is_dir=True):
        monkeypatch.setattr(trainer, "build_model", must_not_start)
        line = cli_error(capsys, standin_train_argv(corpus, tmp_path / "r"))
    assert f"argument --out-dir: '{tmp_path / 'r'}' is in use by another memmix process (pid {os.getpid()})" in line
    monkeypatch.undo()
    assert memmix_cli(standin_train_argv(corpus, tmp_path / "r"), capsys)[0] == 0  # free again once the holder ended


def test_a_second_recall_onto_a_busy_json_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    import memmix.evaluation.recall as recall_lib
    from memmix.files import exclusive_lock

    path = tmp_path / "recall.json"
    monkeypatch.setattr(recall_lib, "run_recall", must_not_start)
    with exclusive_lock(path, "--json"):
        line = cli_error(capsys, ["recall", *RECALL_IN_PROCESS, "--json", path])
    assert f"argument --json: '{path}' is in use by another memmix process (pid {os.getpid()})" in line


def test_a_second_train_process_on_a_busy_out_dir_stops_with_one_line(tmp_path):
    """Real processes: while one trains, a second one into the same --out-dir stops with one line."""
    corpus = write_corpus(tmp_path / "c.jsonl", num_docs=200)
    out_dir = tmp_path / "run"
    argv = [PYTHON, "-m", "memmix", "train", "--model", "tiny", "--model-overrides", json.dumps(TINY_MOM), "--data",
            corpus, "--seq-len", "16", "--max-steps", "100000", "--out-dir", str(out_dir), "--no-tensorboard",
            "--no-progress", "--overwrite"]
    first = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"memmix train: error: argument --out-dir: '{out_dir}' is in use by another memmix process (pid "
            f"{first.pid}); wait for it to finish or choose another path"]
    finally:
        first.kill()
        first.communicate()


# ----------------------------------------------------------------------------------------------- metrics


def test_a_restart_before_the_first_checkpoint_drops_the_killed_run_s_lines(tmp_path):
    from memmix.training.trainer import train

    corpus = write_corpus(tmp_path / "c.jsonl")

    def killed(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    config = tiny_train_config(corpus, tmp_path / "r", max_steps=5, save_every=100, plot=True)
    with pytest.raises(KeyboardInterrupt):
        train(config, step_callback=killed)
    assert CheckpointDir(str(tmp_path / "r")).latest() is None
    train(config)
    steps = [r["step"] for r in read_metrics(str(tmp_path / "r"))]
    assert steps == [1, 2, 3, 4, 5]
    assert len(read_metrics(str(tmp_path / "r"), "start")) == 1


# ----------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("delay", [0.3, 1.0, pytest.param(0.2, marks=pytest.mark.slow),
                                   *(pytest.param(d, marks=pytest.mark.slow) for d in (0.5, 0.8, 1.5, 2.0, 3.0))])
def test_ctrl_c_at_any_moment_of_train_start_up_is_one_line_and_exit_130(delay, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl")
    proc = subprocess.Popen([PYTHON, "-m", "memmix", "train", "--model", "tiny", "--model-overrides",
                             json.dumps(TINY_MOM), "--data", corpus, "--seq-len", "16", "--max-steps", "100000",
                             "--out-dir", str(tmp_path / "run"), "--no-tensorboard"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    lines = [line for line in err.strip().splitlines() if not line.startswith("memmix train: tiny (")]
    assert len(lines) == 1 and lines[0].startswith("memmix train: interrupted"), err[-3000:]


# ----------------------------------------------------------------------------------------------- micro-batch


def test_a_micro_batch_larger_than_the_data_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    import memmix.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_model", must_not_start)
    corpus = write_corpus(tmp_path / "c.jsonl")
    line = cli_error(capsys, standin_train_argv(corpus, tmp_path / "r", "--micro-batch-size", "1000000"))
    assert "argument --micro-batch-size: is 1000000 but the data" in line and "use at most" in line
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------- config/weights


def test_a_config_of_another_architecture_than_the_weights_is_an_error(run, tmp_path, capsys):
    out_dir, held_out = run
    swapped = tmp_path / "swapped"
    shutil.copytree(os.path.join(out_dir, "final"), swapped)
    config = json.loads((swapped / "config.json").read_text())
    config["model_type"] = "memmix_bmojo"
    (swapped / "config.json").write_text(json.dumps(config))
    for argv in (["eval", "ppl", "--model", swapped, "--data", held_out, "--seq-len", "16"],
                 ["generate", "--model", swapped, "--prompt", "hi", "--max-new-tokens", "2"]):
        line = cli_error(capsys, argv)
        assert f"argument --model: the weights in '{swapped}' do not fit the model its config.json describes" in line


def test_missing_or_unexpected_weights_are_an_error_naming_the_folder(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out_dir, held_out = run
    for change in ("missing", "unexpected"):
        folder = tmp_path / change
        shutil.copytree(os.path.join(out_dir, "final"), folder)
        state = load_file(str(folder / "model.safetensors"))
        if change == "missing":
            state.pop("model.norm.weight")
        else:
            state["model.extra.weight"] = torch.zeros(2)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        line = cli_error(capsys, ["eval", "ppl", "--model", folder, "--data", held_out, "--seq-len", "16"])
        assert f"the weights in '{folder}' do not fit" in line
        assert ("are missing (e.g. 'model.norm.weight')" if change == "missing" else "model.extra.weight") in line


# ----------------------------------------------------------------------------------------------- diverged recall


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(open(path).read(), parse_constant=refuse)


def test_a_diverged_recall_run_is_reported_and_its_json_is_valid(tmp_path, capsys, monkeypatch):
    import memmix.evaluation.recall.run as recall_run

    train_steps = recall_run.train_steps

    def diverging(*args, **kwargs):  # the run of --lr 1000: its losses end non-finite
        log = train_steps(*args, **kwargs)
        log.losses[-1] = float("nan")
        return log

    monkeypatch.setattr(recall_run, "train_steps", diverging)
    path = tmp_path / "recall.json"
    code, out, err = memmix_cli(["recall", *RECALL_IN_PROCESS, "--json", path], capsys)
    assert code == 0
    assert "diverged" in out.splitlines()[2] and "linear diverged" in out.splitlines()[-1]
    assert "run linear d=16 lr=" in err and "diverged (training loss nan)" in err
    payload = _strict_json(path)
    assert payload["runs"][0]["final_loss"] is None and payload["runs"][0]["diverged"] is True
    assert payload["results"][0]["diverged"] is True
    code, out, _ = memmix_cli(["recall", *RECALL_IN_PROCESS, "--json", path], capsys)  # read back and continued
    assert code == 0 and "linear diverged" in out.splitlines()[-1]


def test_every_json_writer_writes_null_for_non_finite_numbers(tmp_path):
    from memmix.files import atomic_write_json

    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": (float("-inf"),)})
    assert _strict_json(tmp_path / "x.json") == {"a": None, "b": [None, 1.5], "c": [None]}


# ----------------------------------------------------------------------------------------------- JSONL text


@pytest.mark.parametrize("value, kind", [(["a", "b"], "list"), ({"x": "y"}, "dict"), (3.5, "float"), (7, "int")])
def test_a_jsonl_text_that_is_not_a_string_is_an_error(value, kind, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    line = cli_error(capsys, ["prepare", path, "--out", tmp_path / "s"])
    assert f"argument --text-field: {path}:2: field 'text' is a {kind}, not a string" in line
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------------- train data


def test_eval_batches_beyond_the_validation_set_are_refused(tmp_path, capsys, monkeypatch):
    import memmix.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_model", must_not_start)
    corpus = write_corpus(tmp_path / "c.jsonl")
    held = write_corpus(tmp_path / "v.jsonl", num_docs=4, seed=1)
    line = cli_error(capsys, standin_train_argv(corpus, tmp_path / "r", "--val-data", held, "--eval-every", "1",
                                                "--eval-batches", "100000"))
    assert "argument --eval-batches: is 100000 but the validation data" in line and "use at most" in line


def test_a_resume_after_the_data_changed_at_the_same_path_says_so(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    run_dir = tmp_path / "r"
    assert memmix_cli(standin_train_argv(corpus, run_dir), capsys)[0] == 0
    code, _, err = memmix_cli(standin_train_argv(corpus, run_dir, "--resume", "--max-steps", "3"), capsys)
    assert code == 0 and "changed" not in err  # the same data: nothing to say
    write_corpus(tmp_path / "c.jsonl", seed=5)  # other text at the same path
    code, _, err = memmix_cli(standin_train_argv(corpus, run_dir, "--resume", "--max-steps", "4"), capsys)
    assert code == 0
    assert f"warning: the data at '{corpus}' changed since the run's step 3" in err
    assert "data_content" in read_metrics(str(run_dir), "start")[-1]["changed_settings"]


def test_out_dir_equal_to_the_data_folder_is_refused(tmp_path, capsys):
    texts = _text_corpus(tmp_path / "texts", 5)
    line = cli_error(capsys, standin_train_argv(texts, texts))
    assert f"argument --out-dir: '{texts}' is also the input --data" in line
    assert sorted(os.listdir(texts)) == [f"doc_{i:03d}.txt" for i in range(5)]


# -------------------------------------------------------------------------------- inputs that once ended in a traceback


def test_a_dangling_symlink_in_a_data_folder_is_an_error_naming_it(tmp_path, capsys):
    texts = _text_corpus(tmp_path / "texts", 3)
    os.symlink(tmp_path / "gone.txt", texts / "link.txt")
    line = cli_error(capsys, ["prepare", texts, "--out", tmp_path / "s"])
    assert f"data file '{texts / 'link.txt'}' cannot be read (a symbolic link to a missing file)" in line


def test_disk_full_while_saving_a_checkpoint_is_an_error_naming_the_step(tmp_path, capsys, monkeypatch):
    import memmix.training.checkpoint as checkpoint

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    corpus = write_corpus(tmp_path / "c.jsonl")
    monkeypatch.setattr(checkpoint, "atomic_save", full)
    line = cli_error(capsys, standin_train_argv(corpus, tmp_path / "r"))
    assert "argument --out-dir: could not write the checkpoint of step 2 (No space left on device); no checkpoint " \
           "was written" in line


@pytest.mark.parametrize("overrides, message", [
    ('{"vocab_size": 10}', "argument --model-overrides: 'vocab_size' is set by memmix train (pass --vocab-size"),
    ('{"eos_token_id": 3}', "argument --model-overrides: 'eos_token_id' is set by memmix train")])
def test_model_overrides_of_what_train_sets_are_refused(overrides, message, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    line = cli_error(capsys, ["train", "--model", "tiny", "--data", corpus, "--out-dir", tmp_path / "r",
                              "--model-overrides", overrides])
    assert message in line


@pytest.mark.parametrize("text", ["max_steps: .inf\n", "max_steps: 1e400\n", "lr: 1e400\n", b"lr: 0.1 \xff\n"])
def test_config_files_with_infinite_or_non_utf8_values_are_refused(text, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = cli_error(capsys, ["train", "--config", path, "--data", write_corpus(tmp_path / "c.jsonl"), "--out-dir",
                              tmp_path / "r"])
    assert ("is not UTF-8 text" in line if isinstance(text, bytes) else
            "must be a int" in line or "must be a finite number" in line), line


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_train_refuses_seeds_out_of_range(seed, tmp_path, capsys):
    line = cli_error(capsys, standin_train_argv(write_corpus(tmp_path / "c.jsonl"), tmp_path / "r", "--seed", seed))
    assert f"argument --seed: must be an integer in [0, 2**32 - 1], got {seed}" in line


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64 - 1], got -1"),
    (["--seed", str(2**64)], "argument --seed: must be an integer in [0, 2**64 - 1]"),
    (["--temperature", "inf"], "argument --temperature: must be >= 0 and finite"),
    (["--temperature", "nan"], "argument --temperature: must be >= 0 and finite")])
def test_generate_refuses_seeds_out_of_range_and_non_finite_temperatures(argv, message, run, capsys, monkeypatch):
    import memmix.evaluation.loading as loading

    monkeypatch.setattr(loading, "load_model_and_tokenizer", must_not_start)
    assert message in cli_error(capsys, ["generate", "--model", run[0], "--prompt", "hi", *argv])


@pytest.mark.parametrize("damage", ["binary", "folder", "other name"])
def test_a_damaged_latest_pointer_falls_back_to_the_step_files(damage, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    run_dir = tmp_path / "r"
    assert memmix_cli(standin_train_argv(corpus, run_dir), capsys)[0] == 0
    pointer = run_dir / "checkpoints" / "latest"
    pointer.unlink()
    if damage == "binary":
        pointer.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "folder":
        pointer.mkdir()
    else:
        pointer.write_text("../../c.jsonl\n")
    assert CheckpointDir(str(run_dir)).latest() == str(run_dir / "checkpoints" / "step_00000002.pt")
    code, _, err = memmix_cli(standin_train_argv(corpus, run_dir, "--resume", "--max-steps", "3"), capsys)
    assert code == 0 and "Traceback" not in err


def test_convert_of_a_garbage_safetensors_file_is_an_error_and_writes_nothing(tmp_path, capsys):
    src = _fla_checkpoint(tmp_path / "fla")
    with open(os.path.join(src, "model.safetensors"), "wb") as f:
        f.write(os.urandom(256))
    line = cli_error(capsys, ["convert", src, tmp_path / "out"])
    assert f"cannot convert '{src}':" in line and "model.safetensors' could not be read" in line
    assert not (tmp_path / "out").exists()


def test_a_hand_made_checkpoint_with_only_the_format_marker_is_called_incomplete(run, tmp_path, capsys):
    from memmix.training.checkpoint import FORMAT

    path = tmp_path / "step_00000001.pt"
    torch.save({"format": FORMAT}, path)
    line = cli_error(capsys, ["eval", "ppl", "--model", path, "--data", run[1]])
    assert f"argument --model: checkpoint '{path}' is incomplete (no model_spec, model)" in line


# ---------------------------------------------------------------------------------- messages that blame the right thing


def test_weight_decay_times_lr_of_one_or_more_is_blamed_on_weight_decay(tmp_path, capsys):
    line = cli_error(capsys, standin_train_argv(write_corpus(tmp_path / "c.jsonl"), tmp_path / "r", "--weight-decay",
                                                "1e30"))
    assert "argument --weight-decay: 1e+30 times lr 0.003 is >= 1" in line


def test_a_diverged_run_without_a_checkpoint_does_not_claim_one_is_kept(tmp_path, capsys):
    line = cli_error(capsys, standin_train_argv(write_corpus(tmp_path / "c.jsonl"), tmp_path / "r", "--lr", "1e30",
                                                "--weight-decay", "0", "--grad-clip", "0"))
    assert "the run diverged" in line and "no checkpoint was written" in line
    assert "argument --lr" not in line and "is kept" not in line


def test_a_cpu_recall_grid_is_blamed_on_the_option_that_sized_it(capsys, monkeypatch):
    import memmix.evaluation.recall as recall_lib

    monkeypatch.setattr(recall_lib, "run_recall", must_not_start)
    line = cli_error(capsys, ["recall", "--num-train", "1000000000", "--device", "cpu"])
    assert "argument --num-train: this grid takes" in line


def test_a_folder_given_to_config_is_called_a_folder(tmp_path, capsys):
    line = cli_error(capsys, ["train", "--config", tmp_path, "--data", "x"])
    assert f"argument --config: '{tmp_path}' is a folder; pass a YAML or JSON file" in line


def test_shards_format_on_a_text_file_never_advises_deleting_it(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("precious words " * 400)
    line = cli_error(capsys, ["train", "--data", text, "--data-format", "shards", "--out-dir", tmp_path / "r",
                              "--model", "tiny"])
    assert "is not a memmix token shard" in line and "delete" not in line
    assert text.exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--resume", "--overwrite"], "argument --overwrite: does not combine with resume")])
def test_infinite_lr_and_resume_with_overwrite_are_refused(argv, message, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl")
    assert memmix_cli(standin_train_argv(corpus, tmp_path / "r"), capsys)[0] == 0
    before = folder_files(tmp_path / "r")
    assert message in cli_error(capsys, standin_train_argv(corpus, tmp_path / "r", *argv))
    assert folder_files(tmp_path / "r") == before


def test_train_checks_its_settings_before_torch_loads(tmp_path):
    code = ("import sys; from memmix.cli import main\n"
            "try:\n    main(['train', '--lr', '0', '--data', 'x'])\nexcept SystemExit as e:\n    status = e.code\n"
            "print(status, 'torch' in sys.modules)")
    proc = subprocess.run([PYTHON, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert "argument --lr: must be > 0, got 0.0" in proc.stderr


def test_saved_model_files_have_ordinary_permissions(run, tmp_path, capsys):
    mask = os.umask(0)
    os.umask(mask)
    final = os.path.join(run[0], "final")
    for name in os.listdir(final):
        assert stat.S_IMODE(os.stat(os.path.join(final, name)).st_mode) == 0o666 & ~mask, name
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o777 & ~mask


# ----------------------------------------------------------------------------------------------- Python API


@pytest.fixture(scope="module")
def mom_with_vocab_64():
    """A float32 one-layer MoMForCausalLM of vocabulary 64 in eval mode (the bound the API's errors name)."""
    from memmix.models import MoMConfig, MoMForCausalLM

    torch.manual_seed(0)
    return MoMForCausalLM(MoMConfig(vocab_size=64, num_hidden_layers=1, num_memories=2, topk=1, **TINY_MOM)).eval()


@pytest.mark.parametrize("make, message", [
    (lambda: torch.tensor([[1, 64]]), r"input_ids must be token ids in \[0, 64\)"),
    (lambda: torch.tensor([[1, -1]]), r"input_ids must be token ids in \[0, 64\)"),
    (lambda: torch.tensor([[1.0, 2.0]]), "input_ids must be an integer tensor of token ids"),
    (lambda: torch.tensor([[True, False]]), "input_ids must be an integer tensor of token ids"),
    (lambda: torch.zeros(2, 0, dtype=torch.long), r"input_ids must have shape \(B, T\) with T >= 1, got \(2, 0\)")])
def test_api_bad_token_ids_are_a_value_error_naming_them(make, message, mom_with_vocab_64):
    with pytest.raises(ValueError, match=message):
        mom_with_vocab_64(input_ids=make())


def test_api_labels_outside_the_vocabulary_are_refused(mom_with_vocab_64):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 64\) or -100"):
        mom_with_vocab_64(input_ids=ids, labels=torch.tensor([[1, 64, 3]]))
    assert torch.isfinite(mom_with_vocab_64(input_ids=ids, labels=torch.tensor([[1, -100, 3]])).loss)


def test_api_generate_with_1d_ids_is_refused(mom_with_vocab_64):
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\) with T >= 1, got \(3,\)"):
        mom_with_vocab_64.generate(torch.tensor([1, 2, 3]), max_new_tokens=2)
    assert mom_with_vocab_64.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_api_an_attention_mask_of_other_values_than_0_and_1_is_refused(mom_with_vocab_64):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        mom_with_vocab_64(input_ids=ids, attention_mask=torch.tensor([[1.0, 0.5, 1.0]]))
    mom_with_vocab_64(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1]]))


def test_api_layers_refuse_the_wrong_hidden_size_or_a_2d_input():
    from memmix.layers.attention import CausalSelfAttention
    from memmix.layers.bmojo import BMojo
    from memmix.layers.bmojo_f import BMojoF
    from memmix.layers.mom import MixtureOfMemories

    layers = [MixtureOfMemories(hidden_size=32, num_heads=2, head_dim=16, num_memories=2, topk=1),
              CausalSelfAttention(hidden_size=32, num_heads=2),
              BMojo(hidden_size=32, num_heads=2, head_dim=16, window_size=4, chunk_size=4, eidetic_size=4,
                    eidetic_per_chunk=2),
              BMojoF(hidden_size=32, num_heads=2, head_dim=16, window_size=4)]
    for layer in layers:
        with pytest.raises(ValueError, match=r"hidden_states must have hidden size 32 .*got \(1, 4, 16\)"):
            layer(torch.randn(1, 4, 16))
        with pytest.raises(ValueError, match=r"hidden_states must be a floating \(B, T, D\) tensor"):
            layer(torch.randn(4, 32))
        with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
            layer(torch.randn(1, 3, 32), attention_mask=torch.tensor([[1.0, 0.5, 1.0]]))


@pytest.mark.parametrize("op_name", ["gated_delta_rule", "gated_linear_attention"])
def test_api_a_positive_log_decay_is_refused(op_name):
    import memmix.ops as ops

    op = getattr(ops, op_name)
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    g = -torch.rand(1, 4, 2)
    extra = (torch.rand(1, 4, 2),) if op_name == "gated_delta_rule" else ()
    op(q, k, v, g, *extra)
    g[0, 2, 1] = 0.5
    with pytest.raises(ValueError, match=r"g \(log decay\) must be <= 0 everywhere"):
        op(q, k, v, g, *extra)
