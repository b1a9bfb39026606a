"""The decoding loop (evaluate/decoding.py) gives model.generate's tokens, computes no finished rows, and samples
reproducibly."""

from __future__ import annotations

import random

import pytest
import torch

from tunesmith.config import GenerateConfig
from tunesmith.evaluate.decoding import plain_decode
from tunesmith.evaluate.generation import generate


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny import make_model_dir

    path = make_model_dir(tmp_path_factory.mktemp("models") / "llama", "llama", seed=3)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def prompts(tokenizer, n: int = 7, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = range(len(tokenizer.all_special_ids), len(tokenizer))
    return [[rng.choice(words) for _ in range(rng.randint(1, 20))] for _ in range(n)]


def alone(model, prompt: list[int], settings: GenerateConfig, stop: list[int], stopping=None) -> list[int]:
    """Plain model.generate on one prompt (no padding), cut after the first stop token."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=settings.max_new_tokens, repetition_penalty=settings.repetition_penalty,
                         eos_token_id=stop, pad_token_id=0, do_sample=False, temperature=None, top_p=None,
                         top_k=None, stopping_criteria=stopping)[0, len(prompt):].tolist()
    ends = [k for k, t in enumerate(out) if t in stop]
    return out[:ends[0] + 1] if ends else out


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_tokens_are_model_generates(llama, penalty):
    """Prompts of different lengths, batched by 3, one of them stopping mid-batch: each row's tokens are those of
    model.generate on that prompt alone."""
    model, tokenizer = llama
    ps = prompts(tokenizer)
    settings = GenerateConfig(max_new_tokens=12, batch_size=3, repetition_penalty=penalty)
    # a stop token the model produces early for one prompt (a random model rarely emits its end-of-turn token)
    stop = [alone(model, ps[2], settings, [tokenizer.eos_token_id])[3], tokenizer.eos_token_id]
    expected = [alone(model, p, settings, stop) for p in ps]
    assert any(len(e) < 12 for e in expected) and any(len(e) == 12 for e in expected)
    got = generate(model, tokenizer, ps, settings, stop)
    assert [g.ids for g in got] == expected
    assert [g.stopped for g in got] == [e[-1] in stop for e in expected]
    # model.generate on the same left-padded batches agrees too: it leaves the padding out of the repetition
    # penalty (prompt_ignore_length from the attention mask), as this loop does
    batched = plain_decode(model, ps, settings, stop, tokenizer.pad_token_id, order=[6, 5, 4, 3, 2, 1, 0])
    assert batched == expected


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_a_shared_prompt_prefix_runs_once_and_gives_the_same_tokens(llama, monkeypatch, penalty):
    """Prompts that start alike (a chat template's system prompt): the shared tokens run once, in a forward of
    their own, and every row starts from their keys and values; each row's tokens are still model.generate's on
    that prompt alone."""
    from tunesmith.evaluate import decoding

    model, tokenizer = llama
    first_word = len(tokenizer.all_special_ids)
    shared = list(range(first_word, first_word + 10))
    ps = [shared + rest for rest in prompts(tokenizer, n=7, seed=2)]
    settings = GenerateConfig(max_new_tokens=12, batch_size=3, repetition_penalty=penalty)
    stop = [alone(model, ps[2], settings, [tokenizer.eos_token_id])[3], tokenizer.eos_token_id]
    expected = [alone(model, p, settings, stop) for p in ps]
    assert any(len(e) < 12 for e in expected)
    shapes, real = [], decoding._forward
    monkeypatch.setattr(decoding, "_forward", lambda m, ids, *a: shapes.append(tuple(ids.shape)) or real(m, ids, *a))
    assert decoding.decode(model, ps, settings, stop, tokenizer.pad_token_id) == expected
    assert shapes[0] == (1, 10)  # the prefix, once
    assert shapes[1][1] == max(len(p) for p in ps[:3]) - 10  # the first rows run only what follows it


def test_stopping_criteria_see_each_rows_own_tokens(llama):
    """Stopping criteria (a server's stop strings, a cancelled request) are asked after each token with the row's
    prompt and answer, no padding: a row ends where model.generate on its prompt alone ends it."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 16, dtype=torch.bool)

    model, tokenizer = llama
    ps = prompts(tokenizer, n=6, seed=4)
    settings = GenerateConfig(max_new_tokens=10, batch_size=3)
    stopping = StoppingCriteriaList([AtLength()])
    expected = [alone(model, p, settings, [tokenizer.eos_token_id], stopping) for p in ps]
    assert len({len(e) for e in expected}) > 1
    got = generate(model, tokenizer, ps, settings, [tokenizer.eos_token_id], stopping=stopping)
    assert [g.ids for g in got] == expected


def test_finished_rows_leave_the_batch_and_waiting_prompts_join(llama):
    """Every row computed in a decoding step is a row still generating: no padding rows after a row stops."""
    model, tokenizer = llama
    ps = prompts(tokenizer, n=9, seed=1)
    settings = GenerateConfig(max_new_tokens=10, batch_size=4)
    stop = [alone(model, ps[0], settings, [tokenizer.eos_token_id])[1], tokenizer.eos_token_id]
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        got = generate(model, tokenizer, ps, settings, stop)
    finally:
        hook.remove()
    steps = [b for b, width in rows if width == 1]
    assert max(b for b, _ in rows) <= 4
    assert sum(steps) == sum(g.tokens - 1 for g in got)
    assert any(g.tokens < 10 for g in got)


def test_sampling_is_reproducible_and_independent_of_the_batch(llama):
    model, tokenizer = llama
    ps = prompts(tokenizer, n=5, seed=2)
    settings = GenerateConfig(max_new_tokens=8, batch_size=4, do_sample=True, temperature=1.5, top_p=0.9)
    first = [g.ids for g in generate(model, tokenizer, ps, settings, [tokenizer.eos_token_id], seed=7)]
    again = [g.ids for g in generate(model, tokenizer, ps, settings, [tokenizer.eos_token_id], seed=7)]
    one_by_one = [g.ids for g in generate(model, tokenizer, ps, settings.model_copy(update={"batch_size": 1}),
                                          [tokenizer.eos_token_id], seed=7)]
    other = [g.ids for g in generate(model, tokenizer, ps, settings, [tokenizer.eos_token_id], seed=8)]
    assert first == again == one_by_one
    assert other != first


def test_sampling_keeps_the_scores_model_generate_samples_from(llama):
    """Repetition penalty, temperature, top-k (the model's, else transformers' default 50) and top-p: the scores a
    token is drawn from are model.generate's."""
    from tunesmith.evaluate.decoding import processors

    model, tokenizer = llama
    assert len(tokenizer) > 50 and model.generation_config.top_k is None  # the default top-k cuts this vocabulary
    ids = torch.tensor(prompts(tokenizer, n=1, seed=5))
    settings = GenerateConfig(max_new_tokens=1, do_sample=True, temperature=1.3, top_p=0.99, repetition_penalty=1.2)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=True, temperature=1.3,
                         top_p=0.99, repetition_penalty=1.2, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    ours = processors(model, settings)(ids, model(ids).logits[:, -1].float())
    assert torch.equal(torch.isinf(ours), torch.isinf(out.scores[0]))
    torch.testing.assert_close(ours, out.scores[0])


def test_prompt_tuning_goes_through_model_generate(llama):
    """PEFT prompt learning adds virtual tokens inside its own generate: the plain path runs it."""
    from peft import PromptTuningConfig, get_peft_model

    from tunesmith.evaluate.decoding import supports_fast_path

    model, tokenizer = llama
    assert supports_fast_path(model)
    import copy

    tuned = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert not supports_fast_path(tuned)
    ps = prompts(tokenizer, n=3)
    settings = GenerateConfig(max_new_tokens=5, batch_size=2)
    got = generate(tuned, tokenizer, ps, settings, [tokenizer.eos_token_id])
    assert all(g.tokens == 5 for g in got)


def test_growing_cache_layer_holds_what_dynamic_layer_holds_and_copies_only_when_full():
    from transformers.cache_utils import DynamicLayer

    from tunesmith.evaluate.decoding import _GrowingLayer

    torch.manual_seed(0)
    grow, plain = _GrowingLayer(headroom=3), DynamicLayer()
    buffers = set()
    for step, width in enumerate([5, 1, 1, 1, 1, 2]):  # a prefill of 5, then tokens: room for 3, then full
        k, v = torch.randn(2, 3, width, 4), torch.randn(2, 3, width, 4)
        got, want = grow.update(k, v), plain.update(k, v)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        buffers.add(grow._room[0].data_ptr())
        if step == 3:
            assert len(buffers) == 1  # three tokens written into the prefill's spare room, no copy
    assert len(buffers) == 2  # the fourth token found the buffer full
    # `_Batch.select` replaces the views (rows left): the next token is appended after the kept rows' history.
    grow.keys, grow.values = grow.keys[[1]], grow.values[[1]]
    plain.keys, plain.values = plain.keys[[1]], plain.values[[1]]
    k, v = torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4)
    assert all(torch.equal(g, w) for g, w in zip(grow.update(k, v), plain.update(k, v)))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_packed_output_projection_gives_the_same_logits_and_is_removed_after(llama, monkeypatch):
    """Decoding on a CPU multiplies by the output projection through a oneDNN-packed copy of its weight: the same
    logits to float rounding, the same greedy tokens, and the head is as it was once decoding ends."""
    from contextlib import nullcontext

    from tunesmith.evaluate import decoding
    from tunesmith.models.packed_head import packed_output

    model, tokenizer = llama
    head = model.get_output_embeddings()
    ids = torch.tensor(prompts(tokenizer, n=1, seed=5))
    with torch.no_grad():
        plain = model(ids).logits
        with packed_output(model, 3):
            assert "forward" in head.__dict__  # the packed path is the one taken
            packed = model(ids).logits
        assert "forward" not in head.__dict__ and not hasattr(head, "_packed_weight")
        assert torch.equal(model(ids).logits, plain)
    assert torch.allclose(packed, plain, atol=1e-5) and not torch.equal(packed, torch.zeros_like(packed))
    with packed_output(model, 3):  # gradients enabled: the packed kernel has no backward, so it is not used
        assert "forward" not in head.__dict__
    with torch.no_grad():  # overlapping decodings (the server's threads) share one copy; the last one out drops it
        with packed_output(model, 3):
            packed_weight = head._packed_weight
            with packed_output(model, 3):
                assert head._packed_weight is packed_weight
            assert "forward" in head.__dict__ and torch.allclose(model(ids).logits, plain, atol=1e-5)
        assert "forward" not in head.__dict__ and not hasattr(head, "_packed_weight")
    ps = prompts(tokenizer, seed=1)
    settings = GenerateConfig(max_new_tokens=10, batch_size=3)
    stop = [tokenizer.eos_token_id]
    with_packed = decoding.decode(model, ps, settings, stop, tokenizer.pad_token_id)
    monkeypatch.setattr(decoding, "packed_output", lambda model, rows: nullcontext())
    assert decoding.decode(model, ps, settings, stop, tokenizer.pad_token_id) == with_packed


def test_packed_output_projection_leaves_an_adapted_head_alone(llama):
    """A head that is not a plain nn.Linear (here LoRA on the output projection) runs as it is."""
    import copy

    from peft import LoraConfig, get_peft_model

    from tunesmith.models.packed_head import packed_output

    model = get_peft_model(copy.deepcopy(llama[0]), LoraConfig(r=2, target_modules=["lm_head"]))
    head = model.get_output_embeddings()
    with torch.no_grad(), packed_output(model, 3):
        assert "forward" not in head.__dict__ and not hasattr(head, "_packed_weight")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_packed_output_projection_is_skipped_when_memory_is_short(llama, monkeypatch):
    """The copy must fit in a quarter of the memory still available, else the head runs as it is."""
    from tunesmith.models import packed_head

    model = llama[0]
    head = model.get_output_embeddings()
    size = head.weight.numel() * 4
    for available, packed in ((4 * size, True), (4 * size - 1, False), (None, True)):
        monkeypatch.setattr(packed_head, "_available_bytes", lambda: available)
        with torch.no_grad(), packed_head.packed_output(model, 3):
            assert ("forward" in head.__dict__) is packed
