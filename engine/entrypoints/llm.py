"""The offline Python API: LLM(model=...).generate(...) and .chat(...)."""
from __future__ import annotations

import itertools
from typing import Any

from tqdm import tqdm

from kvtier.engine.config import EngineConfig
from kvtier.engine.core.outputs import RequestOutput
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.llm_engine import LLMEngine


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any):
        if model is not None:
            kwargs["model"] = model
        self.engine = LLMEngine(EngineConfig(**kwargs))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine, llm._ids = engine, itertools.count()
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, cache_salt: str | None = None,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """`priority`: one per prompt, lower first (under scheduling_policy="priority")."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        priorities = priority if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError("priority must give one value per prompt")
        ids = []
        for prompt, p, prio in zip(prompts, params_list, priorities):
            rid = str(next(self._ids))
            self.engine.add_request(rid, prompt, p, cache_salt=cache_salt, priority=prio)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None, cache_salt: str | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt, **(chat_template_kwargs or {}))
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, cache_salt)

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        return self.engine.input.chat(conversation, add_generation_prompt, **kwargs)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2)
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
                if not self.engine.has_unfinished_requests() and len(results) < len(ids):
                    raise RuntimeError("engine went idle with requests unfinished")
        finally:
            bar.close()
        return [results[i] for i in ids]
