"""Request and response bodies in OpenAI's chat-completions shape (the subset tuneforge serves)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from .errors import describe

MAX_STOPS = 4  # as OpenAI's API
MAX_CHOICES = 16
SEED_RANGE = (-2**63, 2**63 - 1)  # OpenAI's: a signed 64-bit integer


def _well_formed(text: str) -> str:
    """JSON may carry half of a UTF-16 pair (\\ud800) that no tokenizer can take: refused here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "unpaired_surrogate", "holds an unpaired surrogate ({code}) at character {at}; send "
            "the character itself or a complete surrogate pair",
            {"code": f"\\u{ord(text[exc.start]):04x}", "at": exc.start}) from None
    return text


def _as_parts(value):
    """content: a string is one text part; an array must hold parts; anything else is refused."""
    if isinstance(value, str):
        return [{"type": "text", "text": _well_formed(value)}]
    if isinstance(value, list):
        if not value:
            raise PydanticCustomError("empty_content", "an empty array holds no text; send a string "
                                      "or text parts")
        return value
    raise PydanticCustomError("content_type", "expected a string or an array of text parts, got "
                              "{got}", {"got": describe(value)})


Text = Annotated[str, AfterValidator(_well_formed)]


def _as_stops(value):
    """stop: a string, an array of strings, or null."""
    if value is None or isinstance(value, list):
        return value or []
    if isinstance(value, str):
        return [value]
    raise PydanticCustomError("stop_type", "expected a string or an array of strings, got {got}",
                              {"got": describe(value)})


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # other part types carry other keys

    type: str
    text: Optional[Text] = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise PydanticCustomError(
                "unsupported_part", "{kind} parts are not supported: this model reads text only; "
                "send the content as text", {"kind": repr(self.type)})
        if self.text is None:
            raise PydanticCustomError("missing_text", "a text part needs a 'text' string")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # name, ... are ignored

    # developer is OpenAI's newer name for system
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[list[ContentPart], BeforeValidator(_as_parts)]

    def text(self) -> str:
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False  # a last chunk with usage only


class ChatCompletionRequest(BaseModel):
    # unknown fields (user, metadata, store, ...) are ignored rather than refused, as clients send
    # them; the known ones are strict: "1" is not a number, 2.0 not an integer, 1 not a boolean
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)  # capped to what the context leaves
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name for max_tokens
    stop: Annotated[list[Text], BeforeValidator(_as_stops), Field(max_length=MAX_STOPS)] = []
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices; they share one generation batch
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    # fields that would change the answer in ways tuneforge does not implement: refused when set
    # (unsupported_field), never silently ignored
    tools: Optional[list] = None
    tool_choice: Any = None
    response_format: Optional[dict] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None

    def unsupported_field(self) -> str | None:
        """The first field set to something this server cannot honour, or None."""
        asked = {
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
            "response_format": (self.response_format or {}).get("type", "text") != "text",
            "logprobs": bool(self.logprobs),
            "top_logprobs": bool(self.top_logprobs),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "logit_bias": bool(self.logit_bias),
        }
        return next((name for name, on in asked.items() if on), None)

    def stop_list(self) -> list[str]:
        return [s for s in self.stop if s]

    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Optional[Literal["stop", "length"]]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "tuneforge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
