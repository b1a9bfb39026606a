"""Score a model on a split with its objective's metrics (every process takes a share of batches)."""

from __future__ import annotations

from collections import defaultdict

import torch

from ..data.collate import collate
from ..data.batches import eval_batches
from ..progress import bar


@torch.no_grad()
def evaluate(model, objective, obj_cfg, examples: list[dict], batch_size: int, pad_id: int,
             accelerator=None, desc: str = "eval", details: dict | None = None) -> dict[str, float]:
    """The objective's metrics on `examples`. `details`: filled with what an objective that has a `details` hook
    reports beyond its metrics (a classifier's confusion counts), for summary.json and the report."""
    was_training = model.training
    model.eval()
    batches = eval_batches([len(e["input_ids"]) for e in examples], batch_size)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    outputs: dict[str, list] = defaultdict(list)
    for idx in bar(batches[rank::world], desc):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        with accelerator.autocast() if accelerator else torch.autocast("cpu", enabled=False):
            step = objective.eval_step(model, batch, obj_cfg)
        for key, values in step.items():
            outputs[key].extend(values)
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([dict(outputs)])
        outputs = defaultdict(list)
        for part in parts:
            for key, values in part.items():
                outputs[key].extend(values)
    model.train(was_training)
    if details is not None and hasattr(objective, "details"):
        details.update(objective.details(dict(outputs), obj_cfg))
    return objective.metrics(dict(outputs), obj_cfg)
