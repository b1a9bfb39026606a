"""The request bodies the API accepts, in OpenAI's shapes. Fields a client may send that tunesmith does not
use are ignored; fields whose meaning it cannot honour (several choices, log-probabilities, tools) are refused,
so a client never gets an answer to a question it did not ask."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


REFUSED = {"logprobs": "log-probabilities are not supported", "tools": "tool calls are not supported",
           "echo": "echo is not supported", "suffix": "suffix (insertion) is not supported"}
"""Fields a request may carry only empty (each request kind has some of them), and why."""


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    """`developer` is OpenAI's newer name for `system`."""
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Body):
    include_usage: bool = False
    """Send one more chunk before `[DONE]` with the token counts (and no choices)."""


class Generation(Body):
    """What chat and text completions share."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    """Most tokens to generate (default: the model's eval.generate.max_new_tokens), at most the server's cap."""
    temperature: Optional[float] = Field(None, ge=0, le=2)
    """0: greedy; above 0: sample at this temperature (default: the model's eval.generate settings)."""
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    logprobs: Union[bool, int, None] = None
    user: Optional[str] = None

    @field_validator("logprobs", "tools", "echo", "suffix", check_fields=False)
    @classmethod
    def _refused(cls, value, info):
        if value:
            raise ValueError(REFUSED[info.field_name])
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (one answer per request)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def stops(self) -> list[str]:
        return [s for s in self.stop or [] if s]


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; either may be given."""
    tools: Optional[list] = None


class CompletionRequest(Generation):
    prompt: Union[str, list[str]]
    echo: bool = False
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt (a string) per request")
            return value[0]
        return value


MAX_INPUTS = 256
"""Most texts one classification request may label."""


class ClassificationRequest(Body):
    model: str
    input: Union[str, list[str]]
    """One text or a list of texts to label."""

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("give at least one text")
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} texts per request")
        return texts


class EmbeddingRequest(Body):
    model: str
    input: Union[str, list[str]]
    """One text or a list of texts to embed (token-id arrays are not read)."""
    encoding_format: Literal["float", "base64"] = "float"
    """float: lists of numbers; base64: little-endian float32 bytes (what the openai client asks for)."""
    dimensions: Optional[int] = None
    """Refused: the model's embeddings have one width."""

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        return ClassificationRequest._texts(value)

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value):
        if value is not None:
            raise ValueError("dimensions (shortened embeddings) is not supported: embeddings have the model's width")
        return value
