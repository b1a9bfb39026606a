"""How tasks are scheduled. One module per regime; each provides, next to its `Config`:

  extra_splits(cfg, train_rows, seed) -> {name: Split}   rows mixed into train (e.g. `replay`); they are
                                                         checked and tokenized with the task's splits
  make_penalty(cfg, model, head, tokenizer, device) -> Anchor | None
                                                         a pull towards the starting weights, added to
                                                         every optimizer step's gradient
and, for a regime over several tasks (multitask),
  check(run_cfg)                      rules across sections, at config validation (raise ValueError)
  prepare(run_cfg, tokenizer) -> (Prepared, Report)      every task's data read, checked and tokenized
  wrap_objective(objective, cfg, prepared) -> objective  the loss and metrics over all tasks
  batches(cfg, train_examples, train_cfg, within) -> epoch -> batches   which examples each step takes
  task_view(trained, name) -> trained                    one task of a finished run (predict/eval --task)
"""

from . import continual, multitask, single

REGIMES = {
    "single": single,
    "continual": continual,
    "multitask": multitask,
}
