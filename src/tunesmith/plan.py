"""`tunesmith plan`: what a run would train and how much memory it needs, before loading any weights.

The model is built on PyTorch's meta device (shapes only, nothing allocated, no weights read), the
tuning's checks run on its config, the tuning is applied, and the parameters are counted. The peak memory of
the process is estimated as weights + gradients + AdamW state (two fp32 copies per trainable weight) + a
runtime allowance + the largest of the phases that run one after another: the training step (`activation_terms`:
per-block values measured with saved-tensor hooks, materialised attention scores, the tuning's own activations
such as LoRA's dropout copies, the LM logits: a chunk of them when the loss is chunked), evaluation
(`forward_bytes`) and generation (`generation_bytes`: the key/value cache), with the holes glibc's heap keeps
after backward (HEAP_HOLES, measured). It is an estimate, not an upper bound; bench/plan_vs_measured.py checks it
against measured peaks.
Shown for the configured tuning and, side by side, for full fine-tuning, LoRA and QLoRA of the same model.

A 4-bit base is counted analytically: bitsandbytes packs two 4-bit weights into each uint8 byte, so a
parameter count of the loaded model (as older peft printed it) sees half the true number for every
quantized layer; the plan reports the true count and the packed storage separately.
"""

from __future__ import annotations

import torch

from . import allocator, distilling
from .build import precision_and_dtype
from .config import RunConfig
from .models.anatomy import head_modules
from .models.load import build_on_meta
from .models.params import count_parameters, format_parameters
from .models.quantize import storage
from .objectives import OBJECTIVES
from .tuning import PLAN_BASELINE, TUNINGS

FP32 = 4


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes:.0f} B"


# Values kept per token per block for backward, measured with torch's saved-tensor hooks on fp32 models (CPU,
# sdpa attention): a gated MLP (Llama family: gate, up, act, product) keeps 4 intermediate-wide tensors and
# the block ~14 hidden-wide ones; a classic block (BERT, GPT-2: fc1, act; hidden dropout) 2 and ~23.
BLOCK_VALUES = {"gated": (14, 4), "classic": (23, 2)}
RUNTIME = 0.75 * 2**30  # Python, torch, transformers and the tokenizer loaded: a process's RSS before any model
LOGIT_COPIES = {"chunked": 3, "whole": 4}  # a chunk: logits, log-softmax, their gradient; whole: + the shifted copy
# glibc's heap keeps the holes backward leaves: each block's freed activations are split by the gradients passed
# on to the block below, and the next block's tensors do not all fit them. Measured (bench/plan_vs_measured.py,
# 4 steps, glibc's default allocator) as resident memory beyond the live tensors: 0.26 (sft 8 x 512, checkpointing),
# 0.36 (dpo 8 pairs x 128, checkpointing), 0.23 (clm 8 x 256) of all blocks' activations, checkpointed or not.
HEAP_HOLES = 0.3


def _dims(config) -> dict:
    h = getattr(config, "hidden_size", None) or getattr(config, "dim", 0) or getattr(config, "n_embd", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None) or 1
    return {"h": h, "heads": heads,
            "layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", 0),
            "inter": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or (h // heads if h else 0),
            "vocab": getattr(config, "vocab_size", 0) or 0}


def _attention_dropout(config) -> float:
    return max(float(getattr(config, key, 0) or 0) for key in
               ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "attention_probs_dropout"))


def activation_terms(config, *, tokens: int, seq: int, head: str, value_bytes: int, gated: bool,
                     adapter_values: float = 0.0, loss_chunk: int = 0, checkpointing: bool = False) -> dict:
    """Bytes kept for backward in one training step of `tokens` tokens (batch x sequences x length), by term:
    blocks (per token per layer a*h + m*intermediate values, BLOCK_VALUES), attention scores (heads x length
    per token per layer, kept only when attention is materialised: eager attention, or attention dropout in
    training, which makes sdpa fall back to the explicit softmax; x2.25 with dropout: probabilities, dropped
    copy, mask), the tuning's own (LoRA: dropout copies of each adapted module's input), and the LM logits
    in float32 (chunk x vocab when the loss is chunked, else tokens x vocab, LOGIT_COPIES each). With
    gradient checkpointing each block keeps only its input (h values per token) and one block's activations
    exist at a time, while it is recomputed. `heap holes`: what the allocator keeps resident after backward
    frees them (HEAP_HOLES of every block's activations, with checkpointing or without)."""
    d = _dims(config)
    if not d["h"] or not d["layers"]:
        return {}
    a, m = BLOCK_VALUES["gated" if gated else "classic"]
    dropout = _attention_dropout(config)
    materialised = getattr(config, "_attn_implementation", "sdpa") == "eager" or dropout > 0
    per_layer = {"blocks": tokens * (a * d["h"] + m * d["inter"]) * value_bytes,
                 "attention": tokens * d["heads"] * seq * (2.25 if dropout > 0 else 1) * value_bytes
                 if materialised else 0.0,
                 "adapters": tokens * adapter_values / d["layers"] * value_bytes}
    if checkpointing:
        terms = {"block inputs": d["layers"] * tokens * d["h"] * value_bytes, **per_layer}
    else:
        terms = {k: v * d["layers"] for k, v in per_layer.items()}
    # Only tensors under the allocator's mmap threshold come from the heap and leave holes there (allocator.py):
    # a block's hidden-wide tensors (and the adapters' input copies) and its intermediate-wide ones, by size.
    limit = allocator.heap_limit()
    hidden, inter = (tokens * width * value_bytes for width in (d["h"], d["inter"]))
    in_heap = (a * hidden + per_layer["adapters"]) * (hidden < limit) + m * inter * (inter < limit)
    if in_heap:
        terms["heap holes"] = HEAP_HOLES * d["layers"] * in_heap
    if head in ("causal-lm", "masked-lm"):
        kept = min(loss_chunk, tokens) if loss_chunk > 0 else tokens
        terms["logits"] = kept * d["vocab"] * FP32 * LOGIT_COPIES["chunked" if loss_chunk > 0 else "whole"]
    return terms


def forward_bytes(config, *, tokens: int, seq: int, head: str, value_bytes: int, gated: bool,
                  loss_chunk: int = 0) -> float:
    """Peak of a forward pass without gradient (evaluation, the dpo reference pass): one block's activations
    at a time, and the logits (a chunk, or all tokens', with their log-softmax)."""
    terms = activation_terms(config, tokens=tokens, seq=seq, head=head, value_bytes=value_bytes, gated=gated,
                             loss_chunk=loss_chunk, checkpointing=True)
    terms.pop("block inputs", None)
    terms.pop("heap holes", None)  # no backward
    if "logits" in terms:
        terms["logits"] = terms["logits"] / LOGIT_COPIES["chunked" if loss_chunk > 0 else "whole"] * 2
    return sum(terms.values())


def generation_bytes(config, *, batch: int, prompt: int, new_tokens: int, value_bytes: int, gated: bool) -> float:
    """Peak of generating `new_tokens` after `prompt`-token prompts, `batch` at a time: the key/value cache
    (2 x layers x kv heads x head_dim per token) at full length, plus the prompt's forward pass, plus in fp32 the
    packed copy of the output projection that decoding on a CPU multiplies through (models/packed_head.py)."""
    d = _dims(config)
    if not d["h"] or not d["layers"]:
        return 0.0
    cache = 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * batch * (prompt + new_tokens) * value_bytes
    prefill = forward_bytes(config, tokens=batch * prompt, seq=prompt, head="", value_bytes=value_bytes, gated=gated)
    packed_head = d["vocab"] * d["h"] * FP32 if value_bytes == FP32 else 0
    return cache + prefill + packed_head


def memory(*, trainable: int, frozen: int, frozen_bytes: int, packed: dict | None, activations: float) -> dict:
    """Peak process memory by part. Trainable tensors are fp32 (master weights, gradients, two AdamW moments);
    frozen ones are in the load dtype, except the 4-bit weights, counted as packed bytes plus block scales;
    `activations` is the largest of the phases (training step, evaluation, generation); `runtime` the process
    itself (RUNTIME)."""
    weights = trainable * FP32 + frozen * frozen_bytes
    if packed:
        weights += packed["packed"] + packed["constants"] - packed["params"] * frozen_bytes
    return {"weights": weights, "gradients": trainable * FP32, "optimizer": trainable * 2 * FP32,
            "activations": activations, "runtime": RUNTIME}


def plan(cfg: RunConfig) -> dict:
    objective, tuning = OBJECTIVES[cfg.objective.kind], TUNINGS[cfg.tuning.kind]
    head = objective.HEAD
    kwargs = objective.plan_kwargs(cfg.objective) if hasattr(objective, "plan_kwargs") else {}
    base = distilling.student_on_meta(cfg, head) or build_on_meta(cfg.model, head, kwargs)
    distill = distilling.plan_lines(cfg, head, base)  # counted before the tuning wraps the student
    if hasattr(tuning, "check_model"):
        tuning.check_model(cfg.tuning, base.config, head)
    _, dtype = precision_and_dtype(cfg)
    frozen_bytes = torch.empty((), dtype=dtype).element_size()
    compute = 2 if cfg.train.precision in ("bf16", "fp16") or dtype != torch.float32 else 4
    heads = head_modules(base)
    head_params = sum(p.numel() for h in heads for p in base.get_submodule(h).parameters()) \
        if head == "sequence-classification" else 0
    base_total = sum(p.numel() for p in base.parameters())
    packed = storage(base, heads, getattr(cfg.tuning, "double_quant", True))
    seq = cfg.data.max_length + (tuning.added_positions(cfg.tuning) if hasattr(tuning, "added_positions") else 0)

    # the comparison rows: this run's low-rank settings if it has them, else the baseline's defaults
    lowrank = tuning if hasattr(tuning, "trainable_count") else PLAN_BASELINE
    lowrank_cfg = cfg.tuning if lowrank is tuning else PLAN_BASELINE.Config()
    lora_trainable = lowrank.trainable_count(base, lowrank_cfg, head_params)
    with torch.device("meta"):
        model = tuning.apply(base, cfg.tuning, head)
    trainable, total = count_parameters(model)

    quantized = hasattr(tuning, "load_kwargs")  # the base is loaded quantized (qlora)
    checkpointing = uses_checkpointing(cfg)
    adapters = tuning.activation_values(model, cfg.tuning) if hasattr(tuning, "activation_values") else 0.0
    gated = any("gate" in name.rsplit(".", 1)[-1] for name, _ in base.named_modules())
    sequences = getattr(objective, "SEQUENCES_PER_EXAMPLE", 1)
    chunk = getattr(cfg.objective, "loss_chunk", 0)
    shape = {"seq": seq, "head": head, "value_bytes": compute, "gated": gated}

    def phases(checkpointing: bool, adapter_values: float) -> dict:
        """Peak activation bytes of each phase of the run; they happen one after another, so the largest counts."""
        terms = activation_terms(base.config, tokens=cfg.train.batch_size * sequences * seq, loss_chunk=chunk,
                                 adapter_values=adapter_values, checkpointing=checkpointing, **shape)
        eval_batch = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
        out = {"training": sum(terms.values()), "terms": terms,
               "evaluation": forward_bytes(base.config, tokens=eval_batch * sequences * seq, loss_chunk=chunk, **shape)}
        generate = cfg.eval.generate
        if hasattr(objective, "GENERATION_METRICS") and generate.prompts > 0:
            out["generation"] = generation_bytes(base.config, batch=min(generate.batch_size, generate.prompts),
                                                 prompt=seq, new_tokens=generate.max_new_tokens, value_bytes=compute,
                                                 gated=gated)
        return out

    def peak(p: dict) -> float:
        return max(v for k, v in p.items() if k != "terms")

    run_phases = phases(checkpointing, adapters)
    low_adapters = adapters if lowrank is tuning else 0.0
    # k-bit preparation keeps every non-quantized frozen weight in fp32
    current = memory(trainable=trainable, frozen=total - trainable, frozen_bytes=FP32 if quantized else frozen_bytes,
                     packed=packed if quantized else None, activations=peak(run_phases))
    compare = {
        "full": (base_total, memory(trainable=base_total, frozen=0, frozen_bytes=FP32, packed=None,
                                    activations=peak(phases(False, 0.0)))),
        f"lora (r={lowrank_cfg.r})": (lora_trainable, memory(trainable=lora_trainable, frozen=base_total - head_params,
                                                         frozen_bytes=frozen_bytes, packed=None,
                                                         activations=peak(phases(False, low_adapters)))),
        f"qlora (r={lowrank_cfg.r}, 4-bit)": (lora_trainable, memory(
            trainable=lora_trainable, frozen=base_total - head_params, frozen_bytes=FP32, packed=packed,
            activations=peak(phases(getattr(cfg.tuning, "gradient_checkpointing", True), low_adapters)))),
    }
    return {"model": cfg.model.name, "architecture": type(base).__name__, "trainable": trainable, "total": total,
            "dtype": str(dtype).replace("torch.", ""), "memory": current,
            "quantized": packed if quantized else None, "compare": compare, "distill": distill,
            "phases": run_phases}


def uses_checkpointing(cfg: RunConfig) -> bool:
    """train.gradient_checkpointing, or qlora's own switch (on by default, part of its recipe)."""
    return cfg.train.gradient_checkpointing or getattr(cfg.tuning, "gradient_checkpointing", False)


def render(result: dict, cfg: RunConfig) -> str:
    mem = result["memory"]
    lines = [
        f"model: {result['model']}   tuning: {cfg.tuning.kind}   objective: {cfg.objective.kind}",
        format_parameters(result["trainable"], result["total"]),
        *result.get("distill", []),
    ]
    q = result["quantized"]
    if q:
        packed_total = result["total"] - q["params"] + q["packed"]
        scales = "block scales, double-quantized" if cfg.tuning.double_quant else "block scales"
        lines += [
            f"4-bit base: {q['params']:,d} weights in {q['layers']} linear layers, stored as "
            f"{cfg.tuning.quant_type.upper()} two per byte",
            f"  ({_size(q['packed'])} packed + {_size(q['constants'])} of {scales}). Counting each packed byte as "
            f"one parameter",
            f"  gives the \"all params: {packed_total:,d}\" that older peft printed for this setup; the true",
            f"  number of parameters is {result['total']:,d}.",
        ]
    base = "4-bit + fp32" if q else result["dtype"]
    lines.append(f"peak memory estimate (base weights {base}, batch {cfg.train.batch_size} x "
                 f"{cfg.data.max_length} tokens{', gradient checkpointing' if uses_checkpointing(cfg) else ''}; "
                 f"allocator {allocator.describe().split(',')[0]}):")
    phases = result["phases"]
    busiest = max((k for k in phases if k != "terms"), key=lambda k: phases[k])
    labels = {"weights": "weights", "gradients": "gradients", "optimizer": "AdamW state",
              "activations": f"activations ({busiest})", "runtime": "runtime"}
    for key, label in labels.items():
        lines.append(f"  {label:<24}{_size(mem[key]):>12}")
    for name, n in phases["terms"].items():
        lines.append(f"    training {name:<15}{_size(n):>12}")
    for name in ("evaluation", "generation"):
        if name in phases:
            lines.append(f"    {name:<24}{_size(phases[name]):>12}")
    lines.append(f"  {'total':<24}{_size(sum(mem.values())):>12}  (an estimate of the process's peak RSS, "
                 f"not an upper bound: docs/peft.md#plan)")
    lines.append("the same run with:              trainable       memory")
    for name, (n, m) in result["compare"].items():
        lines.append(f"  {name:<24}{n:>16,d}{_size(sum(m.values())):>13}")
    return "\n".join(lines)
