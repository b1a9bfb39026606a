"""OpenAI's response shapes: the error object every failure is answered with, and how chat and text completions
put an answer (or a streamed piece of one) into a choice."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse


def error(status: int, message: str, *, param=None, code=None, kind="invalid_request_error",
          headers=None) -> JSONResponse:
    """`{"error": {"message", "type", "param", "code"}}` with its HTTP status."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


class ApiError(Exception):
    """A request that cannot be answered, raised anywhere below a route and answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return error(self.status, self.message, param=self.param, code=self.code, kind=self.kind,
                     headers=self.headers)


@dataclass(frozen=True)
class Shape:
    """How one API names its objects and puts text into a choice."""

    prefix: str
    object: str
    chunk_object: str
    chat: bool

    def choice(self, text: str, finish_reason: str) -> dict:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def first(self) -> dict | None:
        """The choice a stream starts with (chat: the assistant's role), or None."""
        if self.chat:
            return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return None

    def delta(self, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Shape("cmpl", "text_completion", "text_completion", chat=False)
