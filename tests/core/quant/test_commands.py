"""The CLI end to end on a tiny saved model with a real (tiny) tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from core.model.hf import save_pretrained

TEXT = [
    "my card was declined at the shop and i need help with a refund",
    "how do i reset my online banking password please",
    "the chest x ray shows no acute cardiopulmonary abnormality",
    "i would like to book a table for two people tonight",
    "can you check the status of my transfer to another account",
    "there is a small scratch on the surface of the tile",
] * 20


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from core.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def model_dir(tmp_path: Path, tiny_model) -> Path:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXT, trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[UNK]", "[EOS]"]))
    d = save_pretrained(tiny_model, tmp_path / "lm")
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(TEXT))
    return f


def test_quantize_then_eval_ppl(quant_home, model_dir, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "q4"
    code, stdout, err = _run(["core", "quantize", "--model", str(model_dir), "--bits", "4", "--method", "gptq",
                              "--calibration-data", str(text_file), "--out", str(out)], capsys)
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["bits"] == "4" and res["linear_bytes_ratio"] < 0.2 and len(res["calibration_sha256"]) == 64
    code, stdout, err = _run(["core", "eval-ppl", "--model", str(out), "--data", str(text_file), "--json"], capsys)
    assert code == 0, err
    q = json.loads(stdout.strip().splitlines()[-1])
    code, stdout, _ = _run(["core", "eval-ppl", "--model", str(model_dir), "--data", str(text_file), "--json"], capsys)
    f = json.loads(stdout.strip().splitlines()[-1])
    assert q["quantized"]["bits"] == "4" and f["quantized"] is None
    assert abs(q["ppl"] / f["ppl"] - 1) < 0.2


def test_cli_errors_are_one_clear_line(quant_home, model_dir, text_file, tmp_path, capsys) -> None:
    code, _, err = _run(["core", "quantize", "--model", str(model_dir), "--bits", "4",
                         "--calibration-data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "calibration data file not found" in err and "Traceback" not in err
    code, _, err = _run(["core", "quantize", "--model", str(model_dir), "--bits", "3",
                         "--calibration-data", str(text_file), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "bits=3 is not supported" in err
    code, _, err = _run(["core", "eval-ppl", "--model", str(tmp_path / "nope"), "--data", str(text_file)], capsys)
    assert code == 2 and "error:" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    code, _, err = _run(["core", "eval-ppl", "--model", str(model_dir), "--data", str(bad)], capsys)
    assert code == 2 and "bad.jsonl:2" in err


def test_prune_command(quant_home, model_dir, text_file, tmp_path, capsys) -> None:
    code, stdout, err = _run(["core", "prune", "--model", str(model_dir), "--sparsity", "0.3", "--steps", "2",
                              "--distill-data", str(text_file), "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["sparsity"] >= 0.3 and res["distill"]["steps"] == 2
    code, stdout, err = _run(["core", "eval-ppl", "--model", str(tmp_path / "p"), "--data", str(text_file),
                              "--json"], capsys)
    assert code == 0, err


def test_generate_runs_a_quantized_checkpoint(quant_home, tiny_model, text_file, tmp_path, capsys) -> None:
    """`core generate --model-dir` opens a quantized directory (manifest, no fp32 weights) like a float one,
    and prints the quantized model's own greedy continuation."""
    from core.model.generate import SamplingParams, generate
    from core.model.tokenizer import Tokenizer as CoreTokenizer
    from core.quant.models import load_model

    tok = CoreTokenizer.train(TEXT, vocab_size=tiny_model.args.vocab_size, min_frequency=1)
    src = save_pretrained(tiny_model, tmp_path / "lm-core")
    tok.save(src)
    out = tmp_path / "q8"
    code, _, err = _run(["core", "quantize", "--model", str(src), "--bits", "8", "--calibration-data",
                         str(text_file), "--out", str(out)], capsys)
    assert code == 0, err
    code, stdout, err = _run(["core", "generate", "my card was", "--model-dir", str(out),
                              "--max-new-tokens", "8"], capsys)
    assert code == 0, err
    qtok = CoreTokenizer.load(out)
    ids = qtok.encode("my card was", bos=True)
    want = generate(load_model(out), [ids], SamplingParams(max_new_tokens=8, eos_token_id=qtok.eos_id))[0]
    assert stdout.strip() == qtok.decode(want).strip()
