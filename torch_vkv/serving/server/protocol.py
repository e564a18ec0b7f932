"""The OpenAI-compatible request schemas (pydantic) and error bodies.

Requests are validated strictly (``"5"`` is not an int, ``true`` is not 1);
unknown fields are ignored. Every error answers
``{"error": {"message", "type", "param", "code"}}``.
"""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at run time.
import json
import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "HTTPError", "StreamOptions", "TextPart",
    "error_body", "validation_error_body",
]  # fmt: skip


class _Base(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # strict: "5" is not an int, true is not 1


class StreamOptions(_Base):
    include_usage: bool = True


class _SamplingFields(_Base):
    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1)  # an extension (vLLM's)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None  # an extension (vLLM's)
    ignore_eos: bool = False  # an extension (vLLM's, SGLang's)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[Union[bool, int]] = None
    user: Optional[str] = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: OpenAI's fields (those that apply) and extensions."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=1)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: Optional[Union[str, list[TextPart]]] = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class HTTPError(Exception):
    """An error answer: HTTP ``status`` and the OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[Union[str, int]] = None) -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Union members add their type to an error's location ("stop", "str"): not part of the field path.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|.*[\[\]-].*)$")


def validation_error_body(errors: list) -> dict:
    """The 400 body for pydantic's ``errors()``: the first error, its field path as ``param``."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # its loc is ("body", character offset), not a field
        where = first.get("loc", ("body", None))[-1]
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        at = f" at character {where}" if isinstance(where, int) else ""
        return error_body(f"body: expected a JSON object, got invalid JSON ({reason}{at})", "invalid_request_error",
                          None, "invalid_json")  # fmt: skip
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p))]
    param = ".".join(loc) or None
    msg = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    got = first.get("input")
    if param is not None and not isinstance(got, (dict, list)):
        msg += f", got {json.dumps(got) if _jsonable(got) else repr(got)}"
    return error_body(msg, "invalid_request_error", param, "invalid_value")


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
