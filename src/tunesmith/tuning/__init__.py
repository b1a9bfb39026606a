"""Which parameters train. One module per method, each with `Config` and `apply(model, cfg, head)`.

`apply` takes a transformers model and the objective's head kind (`sequence-classification`,
`causal-lm`, `masked-lm`) and returns the model to train, with `requires_grad` set.
"""

from . import freeze, full, lora

TUNINGS = {
    "full": full,
    "freeze": freeze,
    "lora": lora,
}
