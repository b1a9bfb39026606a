"""Chat templates: how a conversation becomes the tokens a model trains on, and the tokens it is prompted with.

`ChatFormat` does both with one function (`_pieces`), so a prompt at inference is token for token
the prompt the model saw in training. The template is the tokenizer's own chat template when it
has one, else a named fallback (below); the one used is saved with the tuned tokenizer, so
`generate`, `chat`, `compare` and any serving stack render the way training did.

Every trained assistant turn ends with the template's end-of-turn token (`<|im_end|>`,
`<|eot_id|>`, `</s>`, ...), found by rendering a probe conversation; a template that closes
assistant turns with no special token gets the tokenizer's EOS appended. So a tuned model learns to
stop, and generation stops on that token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .collate import IGNORE_INDEX

# Named fallbacks for tokenizers without a chat template. Assistant turns end with the EOS token.
FALLBACKS = {
    # "User: ...\nAssistant: ...<eos>\n": readable, and the prompt ends where the answer's first word begins
    "plain": (
        "{{ bos_token or '' }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
    # the Stanford Alpaca layout
    "alpaca": (
        "{{ bos_token or '' }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    # no markup: the prompt is continued by the completion (prompt "The capital of France is", completion " Paris.")
    "raw": (
        "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}
TEMPLATES = ("auto", "tokenizer", *FALLBACKS)

# A response no template alters (no spaces to strip, no markup), to see what follows an assistant turn.
_SENTINEL = "TUNESMITHRESPONSE7F3A"


class TemplateError(ValueError):
    """A conversation cannot be rendered and cut into prompt and response pieces."""


def resolve(tokenizer, name: str) -> tuple[str, str]:
    """(name, Jinja source) of the template to use: the tokenizer's own for auto/tokenizer if it has one."""
    from ..errors import ConfigError

    if name in ("auto", "tokenizer"):
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: the default one renders chats
            own = own.get("default")
        if own:
            return "tokenizer", own
        if name == "tokenizer":
            raise ConfigError("the tokenizer has no chat template", where="objective.template",
                              hint=f"choose a fallback: {', '.join(FALLBACKS)}")
        return "plain", FALLBACKS["plain"]
    if name not in FALLBACKS:
        raise ConfigError(f"unknown template {name!r}; choose from {', '.join(TEMPLATES)}", where="objective.template")
    return name, FALLBACKS[name]


def _special_tokens(tokenizer) -> list[str]:
    found = set(tokenizer.all_special_tokens)
    found |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    return sorted((t for t in found if t), key=len, reverse=True)


@dataclass
class ChatFormat:
    """Renders and tokenizes conversations for one tokenizer and template.

    template None means plain text (clm, and `text` rows): no markup, prompts are continued as is.
    """

    tokenizer: Any
    template: str | None
    name: str = "none"
    system: str | None = None
    """System message put first in every conversation that has none."""
    end_of_turn: str | None = field(default=None, init=False)
    """The special token closing an assistant turn; None: the template closes it with none (EOS is added)."""

    @classmethod
    def build(cls, tokenizer, template: str | None, system: str | None = None) -> "ChatFormat":
        if template is None:
            return cls(tokenizer, None, "none", system)
        name, source = resolve(tokenizer, template)
        return cls(tokenizer, source, name, system)

    def __post_init__(self):
        if self.tokenizer.eos_token is None:
            from ..errors import ModelError

            raise ModelError("the tokenizer has no EOS token, so a tuned model could not learn where to stop",
                             where="model.tokenizer")
        if self.template is not None:
            text = self.render([{"role": "user", "content": "Q"}, {"role": "assistant", "content": _SENTINEL}])
            tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
            self.end_of_turn = next((t for t in _special_tokens(self.tokenizer) if tail.startswith(t)), None)

    # -- rendering -------------------------------------------------------------------------------

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system}] + list(messages)
        return list(messages)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text for a conversation (messages as given: no system added)."""
        from jinja2 import TemplateError as JinjaError

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except JinjaError as e:
            raise TemplateError(f"the chat template refused the conversation: {e}") from None

    def _pieces(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, int | None]]:
        """The rendered conversation cut at every assistant response: (text, index of the assistant
        message whose response this is, or None for context). Each response ends with its end-of-turn token."""
        text = self.render(messages, add_generation_prompt)
        pieces: list[tuple[str, int | None]] = []
        done = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(before) and text.startswith(upto) and len(before) >= done):
                raise TemplateError(
                    f"the chat template does not render assistant turn {i} as the continuation of its prompt "
                    "(it renders earlier turns differently, or the prompt ends differently), so the response "
                    "cannot be cut out")
            response = upto[len(before):]
            if self.end_of_turn and self.end_of_turn in response:
                cut = response.index(self.end_of_turn) + len(self.end_of_turn)
                target, rest = response[:cut], response[cut:]
            else:  # the template closes turns with no special token: the target gets EOS
                body = response.rstrip()
                target, rest = body + self.tokenizer.eos_token, response[len(body):]
            pieces += [(text[done:len(before)], None), (target, i), (rest, None)]
            done = len(upto)
        pieces.append((text[done:], None))
        return [(t, i) for t, i in pieces if t]

    def _ids(self, text: str) -> list[int]:
        # rendered text carries its own special tokens (as apply_chat_template assumes)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- what the objectives and generation use --------------------------------------------------

    def encode(self, messages: list[dict], turns: str = "last") -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation ending with an assistant turn: labels are IGNORE_INDEX
        except on the trained responses (the last one, or every one with turns='all'), EOS included."""
        if self.template is None:
            raise TemplateError("conversations need a chat template")
        messages = self.with_system(messages)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise TemplateError("the conversation has no assistant turn to learn")
        trained = set(assistant if turns == "all" else assistant[-1:])
        ids, labels = [], []
        for text, owner in self._pieces(messages, add_generation_prompt=False):
            piece = self._ids(text)
            ids += piece
            labels += piece if owner in trained else [IGNORE_INDEX] * len(piece)
        return ids, labels

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """Plain text as one document: the tokenizer's own special tokens, then EOS; every token a target."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"] + [self.tokenizer.eos_token_id]
        return ids, list(ids)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """The prompt for the model's next turn: exactly the tokens training put before that turn's response."""
        if self.template is None:
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise TemplateError("a plain-text model continues one text; it has no chat template for turns")
            return self.tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]
        ids = []
        for text, _ in self._pieces(self.with_system(messages), add_generation_prompt=True):
            ids += self._ids(text)
        return ids

    def encode_next_prompt(self, messages: list[dict]) -> list[int]:
        """The tokens between the last assistant response (its end-of-turn included) and the prompt for the model's
        next turn: the template's close of that turn, the turns after it and the generation prompt. Appended to
        the tokens of the turns so far, they make `encode_prompt(messages)` with the earlier responses exactly as
        generated (what a multi-turn episode trains on)."""
        if self.template is None:
            raise TemplateError("a plain-text model continues one text; it has no chat template for turns")
        pieces = self._pieces(self.with_system(messages), add_generation_prompt=True)
        last = max((k for k, (_, owner) in enumerate(pieces) if owner is not None), default=None)
        if last is None:
            raise TemplateError("the conversation has no assistant turn to continue after")
        return [i for text, _ in pieces[last + 1:] for i in self._ids(text)]

    def stop_ids(self) -> list[int]:
        """Token ids that end a generated turn: the end-of-turn token and EOS."""
        ids = [self.tokenizer.convert_tokens_to_ids(self.end_of_turn)] if self.end_of_turn else []
        return list(dict.fromkeys(ids + [self.tokenizer.eos_token_id]))
