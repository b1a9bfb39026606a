"""Which layers an adapter goes on: names, regex, all-linear, layer ranges; and mistakes caught early."""

from __future__ import annotations

import pytest
import torch

from tunesmith.errors import ConfigError
from tunesmith.tuning.targets import layer_indices, select


@pytest.fixture
def llama():
    """A small Llama classifier on the meta device (fresh each test: tunings wrap it in place)."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, num_labels=2, pad_token_id=0)
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


def test_names_match_at_the_end_of_full_names(llama):
    chosen = select(llama, ["q_proj", "mlp.down_proj"])
    assert chosen == [f"model.layers.{i}.{n}" for i in range(4) for n in ("self_attn.q_proj", "mlp.down_proj")]


def test_all_linear_leaves_out_the_head(llama):
    chosen = select(llama, "all-linear")
    assert len(chosen) == 4 * 7 and "score" not in chosen


def test_regex_matches_whole_names(llama):
    assert select(llama, r"re:.*layers\.[02]\.self_attn\.(q|v)_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    with pytest.raises(ConfigError, match="matches no module"):
        select(llama, "re:q_proj")  # a fragment does not match a whole name


@pytest.mark.parametrize("layers,expected", [([0, -1], [0, 3]), ("-2:", [2, 3]), ("1:3", [1, 2]), (":1", [0])])
def test_layer_range(llama, layers, expected):
    chosen = select(llama, ["v_proj"], layers)
    assert chosen == [f"model.layers.{i}.self_attn.v_proj" for i in expected]


def test_a_misspelt_target_is_an_error_with_a_suggestion(llama):
    with pytest.raises(ConfigError) as e:
        select(llama, ["q_proj", "vproj"])  # one good name must not hide the bad one
    assert "'vproj' matches no module" in e.value.message and "did you mean 'v_proj'?" in e.value.hint
    assert e.value.where == "tuning.targets"


@pytest.mark.parametrize("layers,message", [([4], "block index 4 is out of range"), ("3:1", "selects no block"),
                                            ("first", "is not a slice")])
def test_bad_layer_ranges(layers, message):
    with pytest.raises(ConfigError, match=message):
        layer_indices(layers, 4)


def test_lora_layer_range_and_rank_set_the_count(llama):
    from tunesmith.tuning import lora

    cfg = lora.Config(r=2, targets=["q_proj", "k_proj"], layers="-1:")
    model = lora.apply(llama, cfg, "sequence-classification")
    trainable, _ = model.get_nb_trainable_parameters()
    # one block: q (32 -> 32) and k (32 -> 16), plus the new head (score: 32 x 2)
    assert trainable == 2 * (32 + 32) + 2 * (32 + 16) + 64
