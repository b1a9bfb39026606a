"""How tasks are scheduled. One module per regime; each provides, next to its `Config`:

  extra_splits(cfg, train_rows, seed) -> {name: Split}   rows mixed into train (e.g. `replay`); they are
                                                         checked and tokenized with the task's splits
  make_penalty(cfg, model, head, tokenizer, device) -> Anchor | None
                                                         a pull towards the starting weights, added to
                                                         every optimizer step's gradient
and optionally
  check(run_cfg)                                         rules spanning axes, at config validation (ValueError)

A regime that orchestrates several trainings (a task sequence, meta-learning episodes) has its run layer
in flows/ (the regime module stays a leaf: it never imports the loop or the artifacts).
"""

from . import continual, meta, single

REGIMES = {
    "single": single,
    "continual": continual,
    "meta": meta,
}
