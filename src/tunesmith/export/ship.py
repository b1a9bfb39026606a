"""`tunesmith export RUN --format merged|gguf`: the tuned model as a plain transformers folder, or as GGUF.

  merged  the tuning folded into the base (a 4-bit base dequantized first), saved with save_pretrained
          as safetensors with the tokenizer; loadable with AutoModelFor...from_pretrained and nothing else
  gguf    the merged model written as one GGUF file (f32, q8_0, q5_1, q5_0, q4_1, q4_0) for llama.cpp and
          friends, with an Ollama Modelfile next to it; Llama-family causal LMs only

Every export is checked against the tuned model it came from: the written files are read back (the folder
with transformers, the GGUF file with transformers' GGUF loader) and run on a few prompts; the logit
difference and greedy continuations are printed and saved next to the export.
"""

from __future__ import annotations

from pathlib import Path

from .. import artifacts
from ..errors import TunesmithError
from . import verify


def export(run: str | Path, fmt: str, *, quant: str = "f32", out: str | Path | None = None,
           prompts: list[str] | None = None, max_new_tokens: int = 16, trust_remote_code: bool = False) -> dict:
    from ..models.load import head_class, quiet_transformers
    from ..trained import load_trained
    from ..tuning import TUNINGS
    from .merge import NotMergeable, is_quantized, merge, refuse_unmergeable

    run = Path(run)
    trained = load_trained(run, trust_remote_code=trust_remote_code)
    if trained.cfg is None:
        raise TunesmithError(f"{run} is a model folder, not a run", hint="export takes a run folder (runs/<name>)")
    head = trained.objective.HEAD
    model, tokenizer = trained.model, trained.tokenizer
    refuse_unmergeable(model)  # says why, where the model knows
    if not TUNINGS[trained.cfg.tuning.kind].MERGEABLE:
        raise NotMergeable(f"tuning {trained.cfg.tuning.kind!r} cannot be folded into the base weights",
                           hint="ship the run's weights folder with its base model, loaded with tunesmith")
    if fmt == "gguf":
        from .gguf import check_exportable

        if head != "causal-lm":
            raise TunesmithError(f"GGUF holds language models; this run trained a {head} model",
                                 hint="use --format merged for classifiers")
        check_exportable(model.config)
    prompts = list(prompts or verify.PROMPTS)
    lm = head == "causal-lm"
    quantized = is_quantized(model)
    reference = verify.outputs(model, tokenizer, prompts, lm, max_new_tokens)
    merged = merge(model).eval()

    target = Path(out) if out else run / "export"
    report = {"run": str(run), "format": fmt, "tuning": trained.cfg.tuning.kind,
              "reference": "4-bit base + adapter" if quantized else "tuned model"}
    report["merged_in_memory"] = verify.compare(reference, verify.outputs(merged, tokenizer, prompts, lm, max_new_tokens))
    if fmt == "merged":
        folder = target / "merged" if out is None else target
        with quiet_transformers():
            merged.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            artifacts.honour_umask(folder)
            reloaded = head_class(head).from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
        report["path"] = str(folder)
        report["written"] = verify.compare(reference, verify.outputs(reloaded, tokenizer, prompts, lm, max_new_tokens))
    else:
        from . import gguf, modelfile
        from .gguf_vocab import end_of_turn

        path = target / f"{run.name}-{quant}.gguf" if out is None or Path(out).suffix != ".gguf" else Path(out)
        gguf.write(merged, tokenizer, path, quant, name=run.name)
        report["modelfile"] = str(modelfile.write(path, tokenizer, trained.generate, end_of_turn(tokenizer)))
        loaded, loaded_tokenizer = gguf.load(path)
        report["path"] = str(path)
        report["quant"] = quant
        report["written"] = verify.compare(
            reference, verify.outputs(loaded, loaded_tokenizer, prompts, lm, max_new_tokens))
    report_path = Path(report["path"]).parent / f"export-{fmt}{'-' + quant if fmt == 'gguf' else ''}.json"
    artifacts.write_json(report_path, report)
    return report


def render(report: dict) -> str:
    lines = [f"wrote {report['path']}"] + ([f"wrote {report['modelfile']}"] if "modelfile" in report else [])
    lines.append(f"  merged model vs {report['reference']}: {verify.describe(report['merged_in_memory'])}")
    what = "GGUF file read back" if report["format"] == "gguf" else "folder reloaded with transformers"
    lines.append(f"  {what} vs {report['reference']}: {verify.describe(report['written'])}")
    return "\n".join(lines)
