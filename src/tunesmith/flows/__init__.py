"""Runs whose regime orchestrates more than one training: a task sequence (continual), episodes (meta).

A flow is the run layer of its regime: it may call the loop, the evaluation and the artifacts, which the
regime module itself (a leaf) never imports. `run.train` hands a config to the flow of its regime when
that flow's `applies(cfg)` says so; every other config runs the single flow in run.py.
"""

from . import continual, meta

FLOWS = {
    "continual": continual,
    "meta": meta,
}


def flow_for(cfg):
    """The flow module that runs `cfg`, or None for the single flow."""
    flow = FLOWS.get(cfg.regime.kind)
    return flow if flow is not None and flow.applies(cfg) else None
