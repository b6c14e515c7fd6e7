"""From what a client sends to token ids the engine can take: tokenizing,
chat templates, and every check a prompt must pass, each before the work it
guards (a prompt that is certainly too long is refused before it is tokenized).

Tokenizing and templating are plain functions of the tokenizer: the async
engine runs them on its own threads, off the event loop and the engine thread.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.errors import RequestError


def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes one token of the vocabulary can stand for."""
    try:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        return max(len(tokenizer.convert_tokens_to_string([p]).encode("utf-8", "replace")) for p in pieces if p)
    except Exception:  # a tokenizer without these calls: a bound nothing real exceeds
        return 64


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of a templated conversation, under transformers 4 and 5 alike
    (5 returns a BatchEncoding unless told otherwise)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False, **kwargs)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


@dataclass
class PromptLimits:
    max_model_len: int
    vocab_size: int
    max_token_bytes: int


class InputProcessor:
    def __init__(self, tokenizer, max_model_len: int, vocab_size: int,
                 blocks_needed: Callable[[int], int], pool_blocks: int) -> None:
        self.tokenizer = tokenizer
        self.limits = PromptLimits(max_model_len, vocab_size, longest_token_bytes(tokenizer))
        self.blocks_needed = blocks_needed  # tokens of one sequence -> blocks it may hold at once
        self.pool_blocks = pool_blocks

    def _too_long(self, tokens: int | str) -> RequestError:
        what = f"{tokens} tokens" if isinstance(tokens, int) else tokens
        return RequestError(f"This model's maximum context length is {self.limits.max_model_len} tokens, but the "
                            f"prompt has {what} (max_model_len leaves no room to generate).", "prompt",
                            "context_length_exceeded")

    def check_text(self, text: str) -> None:
        """Refuse, without tokenizing, a text that cannot fit: each token stands
        for at most max_token_bytes of it."""
        nbytes = len(text.encode("utf-8", "surrogatepass"))
        if nbytes >= self.limits.max_model_len * self.limits.max_token_bytes:
            raise self._too_long(f"at least {nbytes // self.limits.max_token_bytes} tokens")

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(the prompt's text or None, its token ids), checked."""
        if isinstance(prompt, str):
            self.check_text(prompt)
            text, ids = prompt, self.tokenizer(prompt).input_ids
        else:
            if not prompt or not all(type(t) is int and 0 <= t < self.limits.vocab_size for t in prompt):
                raise RequestError("prompt token ids must be a non-empty list of ids within the vocabulary",
                                   "prompt")
            text, ids = None, list(prompt)
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        if len(ids) >= self.limits.max_model_len:
            raise self._too_long(len(ids))
        return text, ids

    def chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        for message in messages:
            content = message.get("content")
            if isinstance(content, str):
                self.check_text(content)
        try:
            return apply_chat_template(self.tokenizer, messages, add_generation_prompt, **kwargs)
        except Exception as e:  # the template rejects what the client sent (roles out of order, ...)
            raise RequestError(f"the messages do not fit the model's chat template: {e}", "messages") from None

    def max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The output bound, and a check that one sequence of prompt +
        max_tokens, at its largest, fits the pool. The n sequences of a request
        need not fit at once: the scheduler runs them as room allows (n itself
        is bounded by SamplingParams)."""
        room = self.limits.max_model_len - num_prompt_tokens
        max_tokens = min(params.max_tokens or room, room)
        needed = self.blocks_needed(num_prompt_tokens + max_tokens)
        if needed > self.pool_blocks:
            raise RequestError(
                f"the request needs up to {needed} KV cache blocks (prompt + max_tokens) but the pool holds "
                f"{self.pool_blocks}; shorten the prompt or max_tokens, or give the engine more KV cache memory",
                "max_tokens" if params.max_tokens else "prompt")
        return max_tokens
