"""From request progress to RequestOutputs: a client request groups n sampled
sequences; each new token is detokenized once and checked against the stop
strings; outputs are cumulative (the LLM API) or deltas (streams), where a
delta carries only what was not handed out before, so that what a slow
reader has not taken yet stays bounded by what was generated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvtier.engine.core.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvtier.engine.core.request import Request, RequestStatus
from kvtier.engine.core.sampling_params import SamplingParams
from kvtier.engine.detokenizer import IncrementalDetokenizer

OutputKind = Literal["cumulative", "delta"]


@dataclass
class RequestGroup:
    """A client request: n sequences sampled from one prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    output_kind: OutputKind = "cumulative"
    sent_tokens: list[int] = field(default_factory=list)  # per child, handed out in deltas so far
    sent_text: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sent_tokens = [0] * len(self.children)
        self.sent_text = [0] * len(self.children)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)

    def on_token(self, req: Request) -> None:
        """The child's newest token (already checked for EOS, stop tokens and length)."""
        i = self.children.index(req)
        p = self.params
        if req.status == RequestStatus.FINISHED_STOPPED and not p.include_stop_str_in_output:
            return  # EOS or a stop token is not part of the text
        stop = self.detokenizers[i].append(req.output_token_ids[-1])
        if stop is not None and not req.is_finished:
            req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop

    def output(self) -> RequestOutput | None:
        """The group's output now; None for a delta with nothing new to say."""
        outs = []
        for i, c in enumerate(self.children):
            out = self._choice(i, c)
            if out is not None:
                outs.append(out)
        if self.output_kind == "delta" and not outs and not self.finished:
            return None
        cached = max(0, self.children[0].num_cached_tokens)
        errors = [c.stop_reason for c in self.children if c.status == RequestStatus.FINISHED_ERROR]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished, cached,
                             error=errors[0] if errors else None, metrics=self._metrics())

    def _choice(self, i: int, c: Request) -> CompletionOutput | None:
        with_logprobs = self.params.logprobs is not None
        text = self.detokenizers[i].text
        finish = c.status.value if c.is_finished else None
        if self.output_kind == "cumulative":
            return CompletionOutput(
                index=i, text=text, token_ids=list(c.output_token_ids),
                cumulative_logprob=c.cumulative_logprob if with_logprobs else None,
                logprobs=list(c.output_logprobs) if with_logprobs else None,
                finish_reason=finish, stop_reason=c.stop_reason)
        if self.sent_tokens[i] < 0:
            return None  # its last delta, with its finish reason, is out
        stable = self.detokenizers[i].stable_length(c.is_finished)
        if stable <= self.sent_text[i] and not c.is_finished:
            return None  # its tokens (and logprobs) go out with the text they turn into
        t0, s0 = self.sent_tokens[i], self.sent_text[i]
        out = CompletionOutput(
            index=i, text=text[s0:stable], token_ids=c.output_token_ids[t0:],
            cumulative_logprob=c.cumulative_logprob if with_logprobs else None,
            logprobs=c.output_logprobs[t0:] if with_logprobs else None,
            finish_reason=finish, stop_reason=c.stop_reason, text_offset=s0)
        self.sent_tokens[i], self.sent_text[i] = len(c.output_token_ids), max(s0, stable)
        if c.is_finished:
            self.sent_tokens[i] = -1
        return out

    def _metrics(self) -> RequestMetrics:
        """Over the group's samples (n > 1): the earliest start and first token, the latest
        token and finish."""
        kids = self.children

        def pick(choose, name):
            values = [getattr(c, name) for c in kids if getattr(c, name) is not None]
            return choose(values) if values else None

        return RequestMetrics(
            arrival_time=min(c.arrival_time for c in kids),
            first_scheduled_time=pick(min, "first_scheduled_time"),
            first_token_time=pick(min, "first_token_time"),
            last_token_time=pick(max, "last_token_time"),
            finished_time=pick(max, "finished_time") if self.finished else None)
