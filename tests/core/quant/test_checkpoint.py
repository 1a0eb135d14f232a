from __future__ import annotations

import json

import pytest
import torch

from core.errors import DataError, ModelNotReady
from core.model.hf import hf_config, save_pretrained
from core.quant.checkpoint import MANIFEST, load_quantized, read_manifest, save_quantized
from core.quant.linear import QuantLinear
from core.quant.pipeline import quantize_model


@pytest.mark.parametrize("bits", [8, 4, "mixed"])
def test_checkpoint_round_trip(quant_home, tmp_path, tiny_model, calib_batches, bits) -> None:
    rep = quantize_model(tiny_model, bits, method="gptq", calib_batches=calib_batches, size_budget=0.2,
                         embeddings_int8=bits == 8, progress=False)
    x = calib_batches[1][:1]
    out = tiny_model(x)
    d = save_quantized(tiny_model, tmp_path / "q", rep.to_dict(), config=hf_config(tiny_model.args),
                       calibration={"file": "x.txt", "sha256": "ab" * 32})
    m = read_manifest(d)
    assert m["bits"] == str(bits) and m["calibration"]["sha256"] == "ab" * 32
    loaded = load_quantized(d)
    assert torch.equal(loaded(x), out)
    qs = [mod for mod in loaded.modules() if isinstance(mod, QuantLinear)]
    assert qs and all(q.qweight.dtype in (torch.int8, torch.uint8) for q in qs)
    # Decoding through the latent cache works on the loaded model.
    cache = loaded.new_cache(1, 40)
    loaded(x, cache=cache)
    assert loaded(torch.tensor([[5]]), cache=cache).shape == (1, 1, tiny_model.args.vocab_size)


def test_incompatible_checkpoints_are_clear(quant_home, tmp_path, tiny_model, calib_batches) -> None:
    with pytest.raises(ModelNotReady, match="no quantized model"):
        load_quantized(tmp_path / "nothing")
    save_pretrained(tiny_model, tmp_path / "float")
    with pytest.raises(DataError, match="float checkpoint, not a quantized one"):
        load_quantized(tmp_path / "float")
    rep = quantize_model(tiny_model, 8, progress=False)
    d = save_quantized(tiny_model, tmp_path / "q", rep.to_dict(), config=hf_config(tiny_model.args))
    man = json.loads((d / MANIFEST).read_text())
    man["format_version"] = 99
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(DataError, match="incompatible quantized checkpoint"):
        load_quantized(d)
    man["format_version"] = 1
    (d / MANIFEST).write_text(json.dumps(man))
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 128  # weights no longer match the config
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError):
        load_quantized(d)
