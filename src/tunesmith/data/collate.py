"""Turn a list of tokenized examples into one padded batch (dynamic padding: to the longest in the batch)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Label value that cross-entropy skips (padding, prompt tokens)."""


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every sequence field; `attention_mask` marks the real tokens.

    Sequence fields pad with: input_ids -> pad_id, labels -> IGNORE_INDEX, anything else -> 0; a field
    named with a prefix (`rejected_input_ids`, `rejected_labels`: a second sequence per example, as
    preference pairs have) pads the same way and gets its own `<prefix>attention_mask`.
    Scalar fields (a class label, a score) become one tensor.
    """
    batch: dict[str, torch.Tensor] = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if isinstance(values[0], (list, tuple)):
            pad = pad_id if key.endswith("input_ids") else IGNORE_INDEX if key.endswith("labels") else 0
            width = max(len(v) for v in values)
            batch[key] = torch.tensor([list(v) + [pad] * (width - len(v)) for v in values], dtype=torch.long)
        else:
            batch[key] = torch.tensor(values)
    for key in [k for k in examples[0] if k.endswith("input_ids")]:
        mask = key[:-len("input_ids")] + "attention_mask"
        if mask not in batch:
            width = max(len(ex[key]) for ex in examples)
            batch[mask] = torch.tensor([[1] * len(ex[key]) + [0] * (width - len(ex[key])) for ex in examples],
                                       dtype=torch.long)
    return batch
