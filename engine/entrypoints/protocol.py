"""Request and response bodies of the OpenAI API, as pydantic models.

Requests validate types and shapes only; value ranges are SamplingParams'
business (`sampling_params()` re-labels its errors with the request's field
names), so the limits live in one place."""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.errors import RequestError
from kvtier.kvstore.validation import describe

# -- requests ------------------------------------------------------------------

class OpenAIRequest(BaseModel):
    # OpenAI clients send fields this server has no use for (e.g. "user",
    # "metadata"); like the OpenAI API and vLLM, ignore them.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


# Accepted only at their neutral value: anything else would silently change
# the meaning of a request this engine cannot honour.
_NEUTRAL_VALUES: dict[str, Any] = {
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
    "logit_bias": None, "best_of": None, "echo": False, "suffix": None,
}


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string in `value` that is not valid Unicode (JSON
    allows "\ud800" alone; nothing downstream can encode it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, path) or _lone_surrogate(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}.{i}")
            if found:
                return found
    return None


class GenerationRequest(OpenAIRequest):
    """The sampling fields that completions and chat share."""
    model: str | None = None  # like vLLM: the first served name when omitted
    n: int | None = None  # None (as some clients send) keeps SamplingParams' default, as for the rest
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None  # vLLM extension: separates tenants' prefix caches
    priority: int = Field(0, ge=-(1 << 63), lt=1 << 63)  # vLLM extension: lower first (--scheduling-policy priority)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        bad = _lone_surrogate(data)
        if bad:
            raise RequestError(f"{bad}: a string holds a lone surrogate, which is not valid Unicode", bad)
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator(*_NEUTRAL_VALUES, mode="after", check_fields=False)
    @classmethod
    def _only_neutral(cls, v: Any, info) -> Any:
        if v is not None and v != _NEUTRAL_VALUES[info.field_name]:
            raise ValueError("is not supported by this server")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _sampling_fields(self) -> dict[str, Any]:
        fields = ("n", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "min_tokens",
                  "ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
        # Unset fields keep SamplingParams' defaults.
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}

    def sampling_params(self) -> SamplingParams:
        try:
            return SamplingParams(**self._sampling_fields())
        except ValidationError as e:
            param, message = describe(e.errors()[0])
            field = self._request_field(param)
            raise RequestError(message.replace(f"{param}:", f"{field}:", 1), field) from None

    def _request_field(self, sampling_field: str | None) -> str | None:
        """The request field a user wrote a SamplingParams field as."""
        return sampling_field


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]
    max_tokens: int | None = 16  # the OpenAI default for completions
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            if len(v) > 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            return v[0]
        if isinstance(v, str) or (isinstance(v, list) and all(type(t) is int for t in v)):
            return v
        raise ValueError("must be a string, a list of one string, or a list of token ids")

    def _sampling_fields(self) -> dict[str, Any]:
        return {**super()._sampling_fields(), "max_tokens": self.max_tokens, "logprobs": self.logprobs}


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra keys (tool_calls, ...) are kept: chat templates may use them.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    def _sampling_fields(self) -> dict[str, Any]:
        fields = super()._sampling_fields()
        # No limit by default: the engine stops at the end of the context.
        fields["max_tokens"] = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        elif self.top_logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        return fields

    def _request_field(self, sampling_field: str | None) -> str | None:
        if sampling_field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return {"logprobs": "top_logprobs"}.get(sampling_field, sampling_field)


# -- responses -----------------------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvtier"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float]
    tokens: list[str]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    """Both the whole response and, when streaming, one chunk of it."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
