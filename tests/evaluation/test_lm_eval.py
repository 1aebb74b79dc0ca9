import importlib.util
import subprocess
import sys
import types

import pytest
import torch

from memmix.evaluation import lm_eval as wrapper
from memmix.evaluation.loading import load_model_and_tokenizer


def test_wrapper_without_lm_eval_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert wrapper.main(["--tasks", "x"]) == 2
    assert "pip install lm_eval" in capsys.readouterr().err


def test_wrapper_registers_memmix_before_handing_over_to_lm_eval(monkeypatch):
    seen = {}

    def cli_evaluate():
        from transformers import AutoConfig

        seen["argv"] = list(sys.argv)
        seen["registered"] = type(AutoConfig.for_model("memmix_mom")).__name__

    fake = types.ModuleType("lm_eval")
    fake_main = types.ModuleType("lm_eval.__main__")
    fake_main.cli_evaluate = cli_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", fake_main)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert wrapper.main(["--model", "hf", "--model_args", "pretrained=/x"]) == 0
    assert seen == {"argv": ["lm_eval", "--model", "hf", "--model_args", "pretrained=/x"], "registered": "MoMConfig"}
    from memmix.cli import main

    assert main(["eval", "lm-eval", "--tasks", "hellaswag", "--batch_size", "4"]) == 0  # options pass through
    assert seen["argv"] == ["lm_eval", "--tasks", "hellaswag", "--batch_size", "4"]


def test_saved_folder_loads_through_the_auto_classes_like_lm_eval_does(trained_run):
    """lm_eval's `hf` model calls AutoModelForCausalLM / AutoTokenizer.from_pretrained on the folder."""
    import memmix  # noqa: F401
    import memmix.models  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = trained_run
    hf_model = AutoModelForCausalLM.from_pretrained(f"{run}/final").eval()
    hf_tok = AutoTokenizer.from_pretrained(f"{run}/final")
    ckpt_model, ckpt_tok = load_model_and_tokenizer(run)
    ids = torch.tensor([hf_tok.encode("the cat sat", add_special_tokens=False)])
    assert ids[0].tolist() == ckpt_tok.encode("the cat sat").tolist()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ckpt_model(input_ids=ids).logits)
    assert hf_tok.eos_token_id == 256 and hf_model.config.eos_token_id == 256


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval is not installed")
def test_lm_eval_runs_a_local_task(trained_run, tmp_path):
    run, _ = trained_run
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text('{"context": "the cat", "continuation": " sat"}\n{"context": "the dog", "continuation": " ran"}\n')
    (task_dir / "tiny.yaml").write_text(
        "task: memmix_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{{{context}}}}'\n"
        "doc_to_target: '{{continuation}}'\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n")
    proc = subprocess.run([sys.executable, "-m", "memmix.evaluation.lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={run}/final,dtype=float32", "--tasks", "memmix_tiny", "--include_path",
                           str(task_dir), "--device", "cpu", "--batch_size", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memmix_tiny" in proc.stdout
