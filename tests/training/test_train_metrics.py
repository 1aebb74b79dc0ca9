import json
import sys

from memmix.training.metrics import MetricsLog, read_metrics


def test_missing_tensorboard_is_a_one_line_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    log = MetricsLog(str(tmp_path), tensorboard=True)
    log.log({"kind": "train", "step": 1, "loss": 2.5})
    log.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard is not installed" in err[0]
    assert read_metrics(str(tmp_path)) == [{"kind": "train", "step": 1, "loss": 2.5}]


def test_resume_drops_lines_after_the_checkpoint_and_a_torn_last_line(tmp_path):
    lines = [json.dumps({"kind": "train", "step": s, "loss": float(s)}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "train", "st')
    log = MetricsLog(str(tmp_path), tensorboard=False, resume_step=3)
    log.log({"kind": "train", "step": 4, "loss": 40.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
