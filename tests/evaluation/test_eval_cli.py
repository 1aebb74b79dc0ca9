
from memmix.cli import main


def _big_tokenizer(path, size: int = 400) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(str(path))
    return str(path)


def _one_error_line(capsys, argv) -> str:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse-level errors exit from inside parse_args
        status = exit_.code
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_eval_and_generate_input_errors(trained_run, tmp_path, capsys):
    run, held_out = trained_run
    big = _big_tokenizer(tmp_path / "big")
    ppl = ["eval", "ppl", "--device", "cpu", "--seq-len", "16"]
    assert "does not exist" in _one_error_line(capsys, ppl + ["--model", str(tmp_path / "nope"), "--data", held_out])
    assert "tokenizer has 400 tokens but the model only 320" in _one_error_line(
        capsys, ppl + ["--model", run, "--data", held_out, "--tokenizer", big])
    assert "does not exist" in _one_error_line(capsys, ppl + ["--model", run, "--data", str(tmp_path / "x.txt")])
    (tmp_path / "empty").mkdir()
    assert "no checkpoints under" in _one_error_line(capsys, ppl + ["--model", str(tmp_path / "empty"), "--data", held_out])
    gen = ["generate", "--model", run, "--device", "cpu", "--prompt"]
    assert "--top-p: must be in (0, 1]" in _one_error_line(capsys, gen + ["hi", "--top-p", "0"])
    assert "prompt is empty" in _one_error_line(capsys, gen + [""])
    assert "unknown option '--temprature' (did you mean --temperature?)" in _one_error_line(
        capsys, gen + ["hi", "--temprature", "0"])


def test_eval_ppl_on_shards_made_by_prepare(trained_run, tmp_path, capsys):
    run, held_out = trained_run
    assert main(["prepare", held_out, "--out", str(tmp_path / "shards"), "--no-progress"]) == 0
    results = []
    for data in (held_out, str(tmp_path / "shards")):
        capsys.readouterr()
        assert main(["eval", "ppl", "--model", run + "/final", "--data", data, "--seq-len", "16", "--device", "cpu"]) == 0
        results.append(capsys.readouterr().out)
    assert results[0] == results[1] and results[0].startswith("perplexity ")


def test_generate_streams_the_same_text_from_a_checkpoint_and_a_saved_folder(trained_run, capsys):
    run, _ = trained_run
    texts = []
    for model_path in (run, run + "/final"):
        capsys.readouterr()
        assert main(["generate", "--model", model_path, "--prompt", "the cat", "--max-new-tokens", "6",
                     "--temperature", "0", "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("the cat") and len(texts[0]) > len("the cat\n")
