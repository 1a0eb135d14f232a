"""``verticals core parity | bench | generate | balance``: the core model's CLI (heavy imports are lazy).

Evaluation commands print exactly one JSON object as the last line of stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    @app.command("parity")
    def parity(json_out: Annotated[bool, typer.Option("--json", help="Print the JSON result only.")] = False,
               seed: int = 0) -> None:
        """Same random weights in ours and transformers' DeepseekV3ForCausalLM: logit diff + greedy match."""
        _quiet_hf()
        from core.model.parity import run_parity

        res = run_parity(seed=seed)
        if not json_out:
            for r in res["configs"]:
                typer.echo(f"{r['config']}: max|dlogit|={r['max_abs_logit_diff']:.2e} "
                           f"greedy_match={r['greedy_match']}", err=True)
        _emit(res)
        if res["max_abs_logit_diff"] > 1e-4 or not res["greedy_match"]:
            raise typer.Exit(1)

    @app.command("bench")
    def bench(json_out: Annotated[bool, typer.Option("--json", help="Print the JSON result only.")] = False,
              prompt_len: int = 512, new_tokens: int = 64, repeats: int = 2,
              threads: Annotated[int, typer.Option(help="torch threads for both sides (0 = torch default)")] = 1,
              speculative: Annotated[bool, typer.Option(help="Also time MTP speculative decoding on the "
                                                        "default trained LM (trains it when missing).")] = True
              ) -> None:
        """Decode tokens/s of ours vs transformers (same weights, prompt, batch 1, fp32 CPU), KV-cache
        bytes per token per layer, and MTP self-speculative speedup on the trained default LM."""
        _quiet_hf()
        from core.model.bench import bench_decode

        res = bench_decode(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, threads=threads or None)
        if speculative:
            from core.model.bench import bench_speculative
            from core.model.default import load_default_lm

            model, tok = load_default_lm(progress=True)
            prompts = [tok.chat_ids([("user", q)]) for q in SPEC_PROMPTS_CHAT] + \
                      [tok.encode(t, bos=True) for t in SPEC_PROMPTS_TEXT]
            res["mtp_speculative"] = bench_speculative(model, prompts, new_tokens=new_tokens, repeats=repeats,
                                                       eos_token_id=tok.eos_id)  # stop at EOS, as real use does
        _emit(res)

    @app.command("generate")
    def generate_cmd(prompt: Annotated[str, typer.Argument(help="Text to continue (or a user message with --chat).")],
                     model_dir: Annotated[Path | None, typer.Option(help="HF-layout or quantized checkpoint; default LM if omitted")] = None,
                     max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                     chat: Annotated[bool, typer.Option(help="Wrap the prompt as a user chat turn.")] = False,
                     speculative: Annotated[bool, typer.Option(help="MTP self-speculative (greedy only).")] = False,
                     seed: int | None = None) -> None:
        """Generate text with the core LM, streaming tokens to stdout."""
        _quiet_hf()
        from core.model.default import load_default_lm
        from core.model.generate import SamplingParams, speculative_generate, stream
        from core.model.tokenizer import Tokenizer
        from core.quant.models import load_model

        if model_dir is not None:  # a float checkpoint or a quantized one (core/quant manifest)
            model, tok = load_model(model_dir), Tokenizer.load(model_dir)
        else:
            model, tok = load_default_lm(progress=True)
        ids = tok.chat_ids([("user", prompt)]) if chat else tok.encode(prompt, bos=True)
        if speculative:
            out = speculative_generate(model, ids, max_new_tokens, tok.eos_id)
            typer.echo(tok.decode(out))
            return
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                eos_token_id=tok.eos_id, seed=seed)
        got: list[int] = []
        shown = ""
        for step in stream(model, [ids], params):
            if step[0] is None or (chat and step[0] in tok.stop_ids()):
                break
            got.append(step[0])
            text = tok.decode(got)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
        sys.stdout.write("\n")

    @app.command("balance")
    def balance(json_out: Annotated[bool, typer.Option("--json", help="Print the JSON result only.")] = False,
                steps: int = 300, docs_per_corpus: int = 1500) -> None:
        """Train the same small MoE twice (same seed, data, init): with and without the aux-loss-free
        bias update; report max/mean expert load for both on dev text (the dev splits: no Banking77)
        and on held-out text in the training corpus mix (``dev_mix_blocks``)."""
        _quiet_hf()
        import tempfile

        from core.model.default import TrainConfig, train_lm

        res = {}
        tok = None
        for on in (True, False):
            cfg = TrainConfig(steps=steps, docs_per_corpus=docs_per_corpus, balance_bias=on)
            with tempfile.TemporaryDirectory() as d:
                m = train_lm(d, cfg, progress=True, tokenizer=tok)
                if tok is None:
                    from core.model.tokenizer import Tokenizer

                    tok = Tokenizer.load(d)
            res["with_bias_update" if on else "without_bias_update"] = {
                k: m[k] for k in ("dev_max_over_mean_load", "dev_mean_max_over_mean", "dev_per_layer",
                                  "dev_loss", "dev_mix_max_over_mean_load", "dev_mix_mean_max_over_mean",
                                  "dev_mix_per_layer", "dev_mix_loss", "final_train_loss", "steps") if k in m}
        _emit({"max_over_mean_load_with_bias": res["with_bias_update"]["dev_max_over_mean_load"],
               "max_over_mean_load_without_bias": res["without_bias_update"]["dev_max_over_mean_load"],
               "dev_mix_max_over_mean_load_with_bias": res["with_bias_update"].get("dev_mix_max_over_mean_load"),
               "dev_mix_max_over_mean_load_without_bias":
                   res["without_bias_update"].get("dev_mix_max_over_mean_load"),
               **res})


SPEC_PROMPTS_CHAT = ["I would like to find a restaurant in San Jose.", "I need to book a flight to Seattle.",
                     "Can you help me reserve a hotel room?"]
SPEC_PROMPTS_TEXT = ["The heart size and pulmonary vascularity", "Findings: Axial CT image of the chest"]
