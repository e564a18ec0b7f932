"""The OpenAI-compatible request schemas (pydantic) and error bodies.

Requests are validated strictly (``"5"`` is not an int, ``true`` is not 1);
unknown fields are ignored. Every error answers
``{"error": {"message", "type", "param", "code"}}``.
"""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at run time.
import json
import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

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
    logit_bias: Optional[dict[str, float]] = None  # refused unless empty: it would change what is sampled
    user: Optional[str] = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: Optional[StreamOptions], info: Any) -> Optional[StreamOptions]:
        # OpenAI's answer too: options of a stream that will not be sent are a mistake, not a no-op.
        if value is not None and not info.data.get("stream", False):
            raise PydanticCustomError("stream_options", 'expected stream_options only with "stream": true, got '
                                      '"stream": false')  # fmt: skip
        return value


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
    # Refused unless absent or trivial (they would change the answer's form): no constrained decoding, no tools.
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None


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

# What a union-typed field accepts, in words: pydantic reports each member's
# failure, and the first alone ("should be a valid string") misleads a client
# that sent a list.
_UNION_FORMS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": 'a string or a list of text parts ({"type": "text", "text": ...})',
    "logprobs": "a boolean or an integer",
}
_MAX_SHOWN = 100  # characters of a client's value quoted in a message


def validation_error_body(errors: list) -> dict:
    """The 400 body for pydantic's ``errors()``: the first error, its field path as ``param``."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # its loc is ("body", character offset), not a field
        where = first.get("loc", ("body", None))[-1]
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        at = f" at character {where}" if isinstance(where, int) else ""
        return error_body(f"body: expected a JSON object, got invalid JSON ({reason}{at})", "invalid_request_error",
                          None, "invalid_json")  # fmt: skip
    loc = _field_path(first)
    union_at = next((i for i, part in enumerate(loc) if _TYPE_TAG.match(part)), None)
    if union_at is not None:
        return _union_error_body(errors, loc[:union_at])
    param = ".".join(loc) or None
    msg = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    got = first.get("input")
    if param is not None and not isinstance(got, (dict, list)):
        msg += f", got {_shown(got)}"
    return error_body(msg, "invalid_request_error", param, "invalid_value")


def _union_error_body(errors: list, field: list[str]) -> dict:
    """The 400 body for a union-typed ``field``: every form it accepts and the
    value sent; when the value's container matched one form alone (a list for
    ``stop``), that form's first inner error too."""
    n, param = len(field), ".".join(field)
    members = [(e, loc) for e in errors for loc in [_field_path(e)]
               if loc[:n] == field and len(loc) > n and _TYPE_TAG.match(loc[n])]  # fmt: skip
    # A member's error at the field itself carries the whole value (a str member always has one for a non-string).
    whole = [e for e, loc in members if len(loc) == n + 1]
    failed_whole = {loc[n] for e, loc in members if len(loc) == n + 1}
    tags = list(dict.fromkeys(loc[n] for _, loc in members))
    msg = f"{param}: expected {_UNION_FORMS.get(field[-1], 'one of ' + ', '.join(tags))}"
    if whole:
        msg += f", got {_shown(whole[0].get('input'))}"
    inner = [(e, loc) for e, loc in members if loc[n] not in failed_whole]
    if inner and len({loc[n] for _, loc in inner}) == 1:
        e, loc = inner[0]
        msg += f" ({'.'.join(field + loc[n + 1 :])}: {e.get('msg', 'invalid')}"
        if not isinstance(e.get("input"), (dict, list)):
            msg += f", got {_shown(e.get('input'))}"
        msg += ")"
    return error_body(msg, "invalid_request_error", param, "invalid_value")


def _field_path(error: dict) -> list[str]:
    return [str(part) for part in error.get("loc", ()) if part != "body"]


def _shown(value: Any) -> str:
    """``value`` as JSON (``repr`` when it is not JSON), cut to ``_MAX_SHOWN`` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
