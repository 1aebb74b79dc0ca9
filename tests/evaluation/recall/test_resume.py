"""Results files: resume of a partial grid, refusal of changed settings, unwritable outputs, Ctrl-C."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from memmix.evaluation.recall import (
    RecallSettingError,
    RecallSettings,
    format_table,
    pool,
    run_recall,
)
from memmix.evaluation.recall import report as report_module
from memmix.evaluation.recall import results as results_module

TINY = dict(models=["gdn", "linear"], seq_lens=[16], num_kv_pairs=[2, 3], d_models=[16], head_dim=8, num_layers=1,
            steps=3, batch_size=4, num_train=16, num_test=8, vocab_size=16, workers=1)
TIMING = ("wall_seconds", "train_seconds", "summary", "notes")


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


@pytest.fixture
def trained_runs(monkeypatch):
    """The keys of the runs train_and_test trains, in order."""
    keys = []
    real = pool.train_and_test

    def spy(spec, *args, **kwargs):
        keys.append(spec.key)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(pool, "train_and_test", spy)
    return keys


def test_a_partial_grid_resumes_without_retraining_and_ends_as_an_uninterrupted_run(tmp_path, trained_runs, capsys):
    path = tmp_path / "runs" / "recall.json"
    settings = RecallSettings(**TINY, json_path=str(path), budget_minutes=1.0)
    ticks = iter([0.0, 30.0, 90.0])  # start; the first run may start (30 s < 1 min); the second may not
    partial = run_recall(settings, progress=False, clock=lambda: next(ticks, 120.0))
    assert trained_runs == ["gdn d=16 lr=0.001 seed=0"] and partial.pending == ["linear d=16 lr=0.001 seed=0"]
    assert "1 left" in capsys.readouterr().err and "run the same command again" in partial.notes[-1]
    first = json.loads(path.read_text())
    assert first["complete"] is False and [r["model"] for r in first["runs"]] == ["gdn"]

    resumed = run_recall(settings, progress=False)
    assert trained_runs == ["gdn d=16 lr=0.001 seed=0", "linear d=16 lr=0.001 seed=0"]  # gdn not trained again
    assert not resumed.pending and [r.model for r in resumed.results] == ["gdn", "linear"]
    final = json.loads(path.read_text())
    assert final["runs"][0] == first["runs"][0]  # the same record, its train_seconds included

    straight = run_recall(dataclasses.replace(settings, json_path=str(tmp_path / "straight.json")), progress=False)
    expected = json.loads((tmp_path / "straight.json").read_text())
    final, expected = _without_timing(final), _without_timing(expected)
    assert final["settings"].pop("json_path") != expected["settings"].pop("json_path")
    assert final == expected
    assert format_table(resumed) == format_table(straight)


def test_a_run_measured_to_overrun_the_budget_waits_for_the_next_call(tmp_path, trained_runs):
    path = tmp_path / "r.json"
    run_recall(RecallSettings(**TINY | dict(models=["gdn"]), json_path=str(path)), progress=False)
    payload = json.loads(path.read_text())
    payload["runs"][0]["train_seconds"] = 40.0  # gdn's runs take 40 s
    path.write_text(json.dumps(payload))
    ticks = iter([0.0])  # then 30 s of a 60 s budget are used
    report = run_recall(RecallSettings(**TINY, seeds=2, json_path=str(path), budget_minutes=1.0), progress=False,
                        clock=lambda: next(ticks, 30.0))
    assert trained_runs[1:] == ["linear d=16 lr=0.001 seed=0", "linear d=16 lr=0.001 seed=1"]
    assert report.pending == ["gdn d=16 lr=0.001 seed=1"]


def test_a_finished_file_is_not_trained_again_and_more_models_only_add_runs(tmp_path, trained_runs):
    settings = RecallSettings(**TINY, json_path=str(tmp_path / "r.json"))
    run_recall(settings, progress=False)
    run_recall(settings, progress=False)
    assert len(trained_runs) == 2
    run_recall(dataclasses.replace(settings, models=["gdn", "linear", "mom"]), progress=False)
    assert trained_runs[2:] == ["mom d=16 lr=0.001 seed=0"]


@pytest.mark.parametrize("change, field", [(dict(steps=4), "steps"), (dict(vocab_size=20), "vocab_size"),
                                           (dict(seed=1), "seed"), (dict(num_kv_pairs=[2]), "num_kv_pairs")])
def test_changed_settings_are_refused_naming_the_setting(tmp_path, trained_runs, change, field):
    settings = RecallSettings(**TINY, json_path=str(tmp_path / "r.json"))
    run_recall(dataclasses.replace(settings, models=["linear"]), progress=False)
    with pytest.raises(RecallSettingError) as err:
        run_recall(dataclasses.replace(settings, **change), progress=False)
    assert err.value.setting == field and str(tmp_path / "r.json") in str(err.value)
    assert len(trained_runs) == 1  # refused before any training


def test_a_file_that_is_not_a_results_file_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"settings": {}, "results": []}')  # an old-format report, say
    with pytest.raises(RecallSettingError) as err:
        run_recall(RecallSettings(**TINY, json_path=str(path)), progress=False)
    assert err.value.setting == "json_path" and "format" in str(err.value)


@pytest.mark.parametrize("field", ["json_path", "plot_path", "state_plot_path"])
def test_unwritable_outputs_are_refused_before_any_training(tmp_path, trained_runs, field):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(RecallSettingError) as err:
        run_recall(RecallSettings(**TINY, **{field: str(blocker / "out")}), progress=False)
    assert err.value.setting == field and "not a folder" in str(err.value) and trained_runs == []


def test_a_write_that_fails_at_the_end_keeps_the_results_in_a_fallback(tmp_path, monkeypatch, capsys):
    json_path, plot_path = tmp_path / "r.json", tmp_path / "r.png"
    real_json, real_write = results_module.atomic_write_json, report_module.atomic_write

    def refuse(real):
        def write(path, *args, **kwargs):
            if os.path.dirname(os.path.abspath(path)) == str(tmp_path):
                raise OSError(28, "No space left on device")
            return real(path, *args, **kwargs)
        return write

    monkeypatch.setattr(results_module, "atomic_write_json", refuse(real_json))
    monkeypatch.setattr(report_module, "atomic_write", refuse(real_write))
    report = run_recall(RecallSettings(**TINY, json_path=str(json_path), plot_path=str(plot_path)), progress=False)
    assert [r.model for r in report.results] == ["gdn", "linear"] and "gdn" in format_table(report)
    err = capsys.readouterr().err
    fallbacks = [note.split("'")[3] for note in report.notes if note.startswith("could not write")]
    assert len(fallbacks) == 2 and all(path in err for path in fallbacks)
    try:
        with open(fallbacks[0]) as f:
            saved = json.load(f)
        assert [r["model"] for r in saved["results"]] == ["gdn", "linear"] and saved["complete"]
        with open(fallbacks[1], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        for path in fallbacks:
            os.unlink(path)
    assert not json_path.exists() and not plot_path.exists()


_INTERRUPTED = textwrap.dedent("""
    import sys
    from memmix.evaluation.recall import RecallSettings, run_recall

    settings = RecallSettings(models=["gdn", "linear", "mom"], seq_lens=[16], num_kv_pairs=[2], d_models=[16],
                              head_dim=8, num_layers=1, steps=10_000_000, batch_size=4, num_train=16, num_test=8,
                              vocab_size=16, workers=2, json_path=sys.argv[1])
    try:
        run_recall(settings, progress=False)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
""")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"spawn_main" in f.read()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc")
def test_ctrl_c_stops_every_worker_at_once(tmp_path):
    import memmix

    root = os.path.dirname(os.path.dirname(os.path.abspath(memmix.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, str(tmp_path / "r.json")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = [pid for pid in _children(proc.pid) if _is_worker(pid)]
        assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else "no workers started"
        time.sleep(3)  # the workers import torch and start training
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and out.strip() == "interrupted", err
    assert "Traceback" not in err  # no worker printed a KeyboardInterrupt
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)]
