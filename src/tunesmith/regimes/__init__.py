"""How tasks are scheduled. One module per regime; each provides, next to its `Config`:

  extra_splits(cfg, train_rows, seed) -> {name: Split}   rows mixed into train (e.g. `replay`); they are
                                                         checked and tokenized with the task's splits
  make_penalty(cfg, model, head, tokenizer, device) -> Anchor | None
                                                         a pull towards the starting weights, added to
                                                         every optimizer step's gradient
"""

from . import continual, single

REGIMES = {
    "single": single,
    "continual": continual,
}
