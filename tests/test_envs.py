"""The environments: exact arithmetic rewards, Nim's legality and opponent, held-out seeds kept out of training,
and an episode rendered through the chat template turn by turn with only the model's tokens as targets."""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith import envs
from tunesmith.envs import arithmetic, nim


def test_arithmetic_rewards_the_exact_answer_by_the_documented_parse_rule():
    cfg = arithmetic.Config(digits=2, operations=["+"])
    question, answer = arithmetic.problem(cfg, 7)
    env = envs.make(cfg)
    assert env.reset(7) == question and question.endswith("Reply with the number only.")
    for reply, correct, alone in [(str(answer), 1, 1), (f"{answer}.", 1, 1), (f"The answer is {answer}.", 1, 0),
                                  (f"3 + 4 = 7, so {answer}", 1, 0), (str(answer + 1), 0, 1),
                                  (f"{answer} or {answer + 1}", 0, 0), ("I do not know", 0, 0), ("", 0, 0)]:
        env.reset(7)
        obs, reward, done = env.step(reply)
        assert done and obs == "" and reward == correct, reply
        assert env.outcome() == {"accuracy": (float(correct), 1.0), "format_rate": (float(alone), 1.0)}, reply
    bonus = envs.make(arithmetic.Config(digits=2, operations=["+"], format_reward=0.5))
    bonus.reset(7)
    assert bonus.step(str(answer))[1] == 1.5
    bonus.reset(7)
    assert bonus.step(f"It is {answer + 1}")[1] == 0.0


def test_arithmetic_problems_are_exact_and_fixed_by_their_seed():
    cfg = arithmetic.Config(digits=3, operations=["+", "-", "*"], words=False)
    for seed in range(200):
        question, answer = arithmetic.problem(cfg, seed)
        a, op, b = question.removeprefix("What is ").split("?")[0].split()
        assert answer == eval(f"{a} {op} {b}") and answer >= 0  # noqa: S307 - our own two numbers and an operator
        assert arithmetic.problem(cfg, seed) == (question, answer)
    assert arithmetic.parse("1,234 apples") == 1234 and arithmetic.parse("-5") == -5
    assert arithmetic.parse("4 2") == 2 and arithmetic.parse("none") is None


def test_training_leaves_out_the_questions_of_held_out_episodes():
    from tunesmith.data.config import DataConfig
    from tunesmith.objectives.grpo import Config

    # one-digit sums: 200 possible questions, so many training seeds repeat a held-out one
    cfg = Config(env={"kind": "arithmetic", "digits": 1, "operations": ["+"], "words": False, "train_seeds": 500,
                      "test_seeds": 50})
    splits = envs_splits(cfg, DataConfig(train="env:arithmetic"))
    held = {r["observation"] for r in splits["test"].rows}
    assert [r["seed"] for r in splits["test"].rows] == list(range(envs.HELD_OUT, envs.HELD_OUT + 50))
    assert 0 < len(splits["train"].rows) < 500 and not held & {r["observation"] for r in splits["train"].rows}
    # Nim: the same opening plays out differently, so no seed is left out
    game = Config(env={"kind": "nim", "train_seeds": 100, "test_seeds": 20})
    assert len(envs_splits(game, DataConfig(train="env:nim"))["train"].rows) == 100


def envs_splits(cfg, data):
    from tunesmith.objectives import rl

    return rl.make_splits(cfg, data)


def test_nim_illegal_moves_lose_and_legal_ones_are_answered():
    cfg = nim.Config(stones_min=7, stones_max=7, take=3, skill=1.0)
    env = envs.make(cfg)
    for reply in ("0", "4", "take none", "I take 5 stones"):
        assert "7 stones" in env.reset(1)
        obs, reward, done = env.step(reply)
        assert (obs, reward, done) == ("", cfg.illegal_reward, True), reply
        assert env.outcome() == {"win_rate": (0.0, 1.0), "legal_move_rate": (0.0, 1.0)}
    env.reset(1)
    obs, reward, done = env.step("I take 3, then 1")  # the first number is the move: 7 -> 4
    assert not done and reward == 0.0
    # from 4 stones every move loses, so even a perfect opponent moves at random there
    took = int(obs.split()[2].rstrip("."))
    assert 1 <= took <= 3 and f"{4 - took} stone" in obs
    obs, reward, done = env.step(str(4 - took))  # the model takes the rest and wins
    assert (reward, done) == (cfg.win_reward, True)
    assert env.outcome() == {"win_rate": (1.0, 1.0), "legal_move_rate": (2.0, 2.0)}


def test_nim_perfect_opponent_wins_from_a_multiple_of_take_plus_one():
    cfg = nim.Config(stones_min=8, stones_max=8, take=3, skill=1.0)
    for seed in range(20):
        env = envs.make(cfg)
        env.reset(seed)
        done, reward = False, 0.0
        while not done:
            _, reward, done = env.step("1")
        assert reward == cfg.loss_reward and env.outcome()["win_rate"] == (0.0, 1.0)
    # a move taking more stones than are left is illegal even within 1..take
    env = envs.make(nim.Config(stones_min=2, stones_max=2, take=3, skill=0.0))
    env.reset(0)
    assert env.step("3") == ("", -1.0, True)


def test_an_episode_renders_turn_by_turn_with_only_the_model_tokens_as_targets(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.collate import IGNORE_INDEX
    from tunesmith.data.templates import ChatFormat
    from tunesmith.evaluate.generation import Generation
    from tunesmith.train import rollout

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    chat = ChatFormat.build(tokenizer, "auto")
    stop = chat.stop_ids()[0]
    # the model's replies, as a generator would return them: ids with the stop token, and the text the game reads
    words = {"1": "one", "2": "two"}
    script = iter(["1"] * 9)  # always legal: the game plays out to a win or a loss

    def fake_generate(model, tok, prompts, settings, stop_ids, seed=0, **_):
        out = []
        for _ in prompts:
            text = next(script)
            out.append(Generation(text, 2, True, tok(words[text], add_special_tokens=False)["input_ids"] + [stop]))
        return out

    monkeypatch.setattr(rollout, "generate", fake_generate)
    cfg = nim.Config(stones_min=9, stones_max=9, take=3, skill=0.0)
    first = envs.make(cfg).reset(5)
    prompt = chat.encode_prompt([{"role": "user", "content": first}])
    source = rollout.Episodes(chat, cfg, {"train": [5]}, {"train": [prompt]})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = source.sample(model, "train", [0], None, seed=0)

    # the same game replayed: the conversation the template renders, every assistant turn a target
    game, conv, replies = envs.make(cfg), [], iter(["1"] * 9)
    conv.append({"role": "user", "content": game.reset(5)})
    done = False
    while not done:
        reply = next(replies)
        obs, _, done = game.step(reply)
        conv.append({"role": "assistant", "content": words[reply]})
        if not done:
            conv.append({"role": "user", "content": obs})
    ids, labels = chat.encode(conv, turns="all")
    r = batch.rollout
    n = int(r.attention[0].sum())
    assert r.ids[0, :n].tolist() == ids
    targets = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert r.positions[0][r.mask[0].bool()].tolist() == targets  # the model's tokens, its stop tokens included
    assert len(targets) == 2 * (len(conv) // 2)  # each reply: one word and its end-of-turn
    won = game.outcome()["win_rate"][0]
    assert batch.scores.tolist() == [cfg.win_reward if won else cfg.loss_reward]
    assert batch.outcomes == [game.outcome()] and batch.answers[0].text.count("|") == len(conv) // 2 - 1


def env_config(path, model, objective: str, env: str, steps: int = 2):
    """A tiny RL run on an environment: no data section, the held-out episodes answered before and after."""
    path.write_text(f"""\
name: env
model: {model}
tuning: {{kind: lora, r: 4, alpha: 16, dropout: 0.0}}
objective: {{kind: {objective}, env: {env}, max_new_tokens: 4}}
data: {{max_length: 96}}
train: {{max_steps: {steps}, batch_size: 2, lr: 1.0e-3, log_every: 1, seed: 0}}
eval: {{forgetting: {{enabled: false}}, generate: {{prompts: 6, batch_size: 6}}}}
""")
    return path


@pytest.mark.parametrize("objective,env,success", [
    ("grpo", "{kind: arithmetic, train_seeds: 40, test_seeds: 6}", ("accuracy", "format_rate")),
    ("ppo", "{kind: nim, train_seeds: 40, test_seeds: 6, max_turns: 3}", ("win_rate", "legal_move_rate")),
])
def test_ppo_and_grpo_train_on_an_environment_and_report_its_success_rates(in_tmp, tiny_llama, objective, env,
                                                                           success):
    from tunesmith.config import load_config
    from tunesmith.run import train

    extra = ["objective.group_size=2"] if objective == "grpo" else ["objective.minibatch=2", "objective.ppo_epochs=1"]
    cfg = load_config(env_config(in_tmp / "e.yaml", tiny_llama, objective, env), extra)
    assert cfg.data.train.startswith("env:")
    summary = train(cfg)
    for scores in (summary["base"]["test"], summary["test"]):
        assert set(success) | {"reward", "kl", "stop_rate", "new_tokens"} <= set(scores)
        assert all(0 <= scores[k] <= 1 for k in success)
    assert summary["base"]["test"]["kl"] == pytest.approx(0, abs=1e-4)
    card = json.loads((in_tmp / "runs" / "env" / "data_card.json").read_text())
    assert card["test"]["rows"] == 6 and card["train"]["format"] == "episode"
    report = (in_tmp / "runs" / "env" / "compare.md").read_text()
    assert success[0] in report
    if "nim" in env:  # its scripted floor, played on the same 6 held-out episodes
        floor = summary["baselines"]["random"]
        assert floor["about"] == "legal moves at random" and floor["test"]["legal_move_rate"] == 1.0
        said = [w for w in summary["diagnosis"]["warnings"] if "random baseline" in w]
        assert bool(said) == (summary["test"]["reward"] <= floor["test"]["reward"])
    else:
        assert "baselines" not in summary  # no scripted player for arithmetic


def test_nim_random_player_floor_is_its_expected_score_over_the_held_out_games():
    from tunesmith.envs import PLAYER_ROUNDS, baselines
    from tunesmith.envs.nim import Config, Nim

    cfg = Config(stones_min=1, stones_max=4, take=3, skill=1.0, max_turns=4)
    seeds = list(range(50))
    floor = baselines(cfg, seeds)["random"]
    # By hand: from 1..3 stones the first move can take them all (won with probability 1/stones, the opponent
    # then always finishes a legal pile of 1..3); from 4 stones every move leaves 1..3 and the perfect opponent
    # wins. The mover is random, the pile is the seed's.
    piles = []
    for seed in seeds:
        game = Nim(cfg)
        game.reset(seed)
        piles.append(game.stones)
    expected = sum(1 / n if n < 4 else 0.0 for n in piles) / len(piles)
    assert floor["win_rate"] == pytest.approx(expected, abs=0.06)  # PLAYER_ROUNDS draws per game
    assert floor["reward"] == pytest.approx(floor["win_rate"]) and floor["legal_move_rate"] == 1.0
    assert PLAYER_ROUNDS >= 10 and baselines(cfg, seeds) == {"random": floor}  # seeded: the same every time


def test_an_environment_reads_no_data(in_tmp, tiny_llama):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.run import train

    cfg = env_config(in_tmp / "e.yaml", tiny_llama, "grpo", "{kind: arithmetic}")
    cfg.write_text(cfg.read_text().replace("data: {max_length: 96}", "data: {train: rows.jsonl, max_length: 96}"))
    with pytest.raises(ConfigError, match="objective.env plays its own episodes") as e:
        train(load_config(cfg))
    assert e.value.where == "data.train" and not (in_tmp / "runs" / "env").exists()
