"""The OpenAI wire format: request bodies the edge accepts and the objects it returns.

Requests ignore unknown fields (clients such as Dify send extras) but validate every
field they do use, with the field named in the error.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.mesh.contracts.limits import MAX_TOP_LOGPROBS
from services.mesh.contracts.template_variables import variables_problem

FinishReason = Literal["stop", "length", "tool_calls"]


# Integers travel in protobuf int32/int64 fields: out-of-range values are a 400 here, not a
# ValueError while the gRPC request is built.
INT32_MAX = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- requests


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ContentPart(_Lenient):
    type: str = Field(description="text or image_url")
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(_Lenient):
    name: str = Field(min_length=1)
    arguments: str = Field("{}", description="JSON text")


class ToolCallIn(_Lenient):
    id: str = ""
    type: str = "function"
    function: FunctionCall | None = None  # some clients echo calls without it; those are skipped


class ChatMessage(_Lenient):
    role: str
    # null is valid for assistant messages that carry tool_calls.
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class ThinkingSwitch(_Lenient):
    """`thinking: {"type": "enabled"}` as Dify (and Zhipu's API) send it."""

    type: Literal["enabled", "disabled"]
    budget_tokens: int | None = Field(None, ge=0, description="accepted; not enforced")


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


# `n`: each choice is a generation of its own (up to this many per request).
MAX_CHOICES = 16

# What `response_format: json_object` asks for, as the schema the inference service constrains to.
JSON_OBJECT_SCHEMA = '{"type":"object"}'


class JsonSchemaFormat(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(
        default_factory=dict, alias="schema", description="the JSON schema the output must match ({}: any JSON)"
    )
    strict: bool | None = Field(
        None,
        description="accepted; the output is always constrained to the schema, and ends valid unless it is cut "
        "at max_tokens (finish_reason length)",
    )


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class SamplingFields(_Lenient):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX, description="vLLM extension; -1 or 0 disables")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM extension; 0 disables")
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="vLLM extension: > 1 discourages repeating generated tokens; 1 disables"
    )
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-sequence token")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=300, description="token id (as a string) → bias added to its logit, -100 to 100"
    )
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description=f"choices to generate (1-{MAX_CHOICES})")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdigit() or int(key) > INT32_MAX:
                raise ValueError(f"keys are token ids; {key!r} is not one")
        return bias

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def wanted_logprobs(self) -> int | None:
        """Log probabilities with this many alternatives per token, or None (set by each endpoint)."""
        return None

    @property
    def json_schema(self) -> str | None:
        """The schema the output must match, or None for free text (set by each endpoint)."""
        return None

    @property
    def wanted_prompt_logprobs(self) -> int | None:
        """Log probabilities of the prompt's own tokens with this many alternatives, or None."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX, description="newer name for max_tokens")
    logprobs: bool | None = Field(False, description="report each token's log probability")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: this many alternatives"
    )
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[FunctionSpec] | None = Field(None, description="legacy form of tools")
    function_call: Literal["none", "auto"] | NamedFunction | None = Field(None, description="legacy tool_choice")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="variables for the model's chat template (e.g. Qwen3's enable_thinking, DeepSeek's thinking)"
    )
    enable_thinking: bool | None = Field(
        None, description="the thinking switch: template variables enable_thinking and thinking, unless set in kwargs"
    )
    thinking: ThinkingSwitch | None = Field(None, description="the thinking switch as {type: enabled|disabled}")
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="template variable reasoning_effort, for templates that read it"
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, variables: dict[str, Any] | None) -> dict[str, Any] | None:
        problem = variables_problem(variables or {})
        if problem is not None:
            raise ValueError(f"{problem.path}: {problem.reason}" if problem.path else problem.reason)
        return variables

    @model_validator(mode="after")
    def _aliases(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.tools is None and self.functions:
            self.tools = [Tool(function=f) for f in self.functions]
        if self.tool_choice is None and self.function_call is not None:
            call = self.function_call
            self.tool_choice = call if isinstance(call, str) else NamedToolChoice(function=call)
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice: no tool named {self.tool_choice.function.name!r} in tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice: required needs tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.json_schema is not None and self.calls_tools:
            raise ValueError(
                "response_format: JSON output cannot be combined with tools (drop tools or use tool_choice none)"
            )
        return self

    @property
    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def json_schema(self) -> str | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return JSON_OBJECT_SCHEMA
        assert fmt.json_schema is not None  # checked by ResponseFormat
        return json.dumps(fmt.json_schema.schema_)

    @property
    def forced_function(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def calls_tools(self) -> bool:
        """Tools are offered to the model (tool_choice none withdraws them)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def template_variables(self) -> dict[str, Any]:
        """What the chat template is given besides messages and tools: chat_template_kwargs, and
        the top-level switches under the names templates read, unless the kwargs set them."""
        variables = dict(self.chat_template_kwargs or {})
        switch = self.enable_thinking
        if switch is None and self.thinking is not None:
            switch = self.thinking.type == "enabled"
        if switch is not None:
            variables.setdefault("enable_thinking", switch)  # Qwen3
            variables.setdefault("thinking", switch)  # DeepSeek-V3.1
        if self.reasoning_effort is not None:
            variables.setdefault("reasoning_effort", self.reasoning_effort)  # gpt-oss
        return variables


# Several prompts in one completion request: each is a generation of its own, `n` times.
MAX_PROMPTS = 32
MAX_COMPLETION_CHOICES = 64  # prompts times n


class CompletionRequest(SamplingFields):
    prompt: Annotated[
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)],
        Field(description=f"a string, token ids, or up to {MAX_PROMPTS} of either (one choice per prompt and n)"),
    ]
    echo: bool = Field(False, description="return the prompt before the completion (with its logprobs when asked)")
    logprobs: int | None = Field(None, ge=0, le=5, description="report log probabilities with this many alternatives")

    @model_validator(mode="after")
    def _choices_bound(self) -> CompletionRequest:
        if len(self.prompts) * (self.n or 1) > MAX_COMPLETION_CHOICES:
            raise ValueError(f"n: prompts times n is at most {MAX_COMPLETION_CHOICES} per request")
        return self

    @property
    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def wanted_prompt_logprobs(self) -> int | None:
        """Echo with logprobs reports the prompt's tokens too."""
        return self.logprobs if self.echo else None

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request


def _items(kind: type) -> type:
    return Annotated[list[kind], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]


class EmbeddingRequest(_Lenient):
    model: str = Field(min_length=1)
    input: str | _items(str) | _items(TokenId) | _items(_items(TokenId)) = Field(  # type: ignore[valid-type]
        description="a string, a list of strings, a list of token ids, or a list of token id lists"
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own dimension count is accepted")
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(
        None,
        ge=-1,
        description="cut each input to this many tokens (-1: the model's limit); unset: the deployment's default",
    )

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _positive_or_model_limit(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (the model's limit) or a number of tokens")
        return value


class RerankDocument(_Lenient):
    text: str


class RerankRequest(_Lenient):
    """Jina/Cohere shape, as Dify sends it."""

    model: str = Field(min_length=1)
    query: str = Field(min_length=1)
    documents: Annotated[list[str | RerankDocument], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS - 1)]
    top_n: int | None = Field(None, ge=1, description="return only the best n (null: all)")
    return_documents: bool = True

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens not computed again (OpenAI reports its prompt caching here)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=lambda value: value is None)
    # Only for reasoning models: DeepSeek's field name (which Dify shows apart from the answer) and
    # vLLM's newer one, as the deployment's reasoning_field says.
    reasoning_content: str | None = Field(None, exclude_if=lambda value: value is None)
    reasoning: str | None = Field(None, exclude_if=lambda value: value is None)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(BaseModel):
    """The legacy completions shape."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, Any]  # {"role", "content"} first, then content, reasoning or tool call pieces, {} last
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format=base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = Field(None, exclude_if=lambda value: value is None)


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
