"""Multi-process training through torch.distributed (gloo on CPU): two processes with batch 8
take the same steps as one process with batch 8 and grad_accum 2, so they end with the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tiny import write_config


def test_two_processes_match_one_process_with_accumulation(in_tmp, tiny_bert, sentiment_dir):
    cfg = write_config(in_tmp / "c.yaml", f"""\
model: {{name: {tiny_bert}, config: {{hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}}}
data: {{train: {sentiment_dir}, max_length: 64}}
eval: {{forgetting: {{enabled: false}}}}
tuning: {{kind: full}}
train: {{epochs: 2, batch_size: 8, lr: 3.0e-3, eval_every: 12, log_every: 4, early_stopping: {{enabled: false}}}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tunesmith", "train", str(cfg), "name=two"], cwd=in_tmp, env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("data card") == 1, "only the main process prints"
    one = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg), "name=one", "train.grad_accum=2"],
                         cwd=in_tmp, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]

    a = load_file(in_tmp / "runs" / "two" / "model" / "model.safetensors")
    b = load_file(in_tmp / "runs" / "one" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    sa, sb = (json.loads((in_tmp / "runs" / n / "summary.json").read_text()) for n in ("two", "one"))
    assert sa["train"]["steps"] == sb["train"]["steps"] == 24
    assert sa["test"]["loss"] == pytest.approx(sb["test"]["loss"], rel=1e-4)
