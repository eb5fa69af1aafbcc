"""vLLM's side of budget-aware JSON (engines/json_budget.py): a per-request logits processor, loaded into vLLM's
engine process, that writes a constrained answer's closing tokens once its token budget runs out.

vLLM applies the structured-output grammar's mask before logits processors, so a closing token the grammar
refuses (where the closing and the grammar disagree) is seen as -inf and left alone: the request then goes on
unwatched. Requests without `CLOSING` in their `extra_args` get no processor at all.
"""

from __future__ import annotations

import llguidance.hf
import torch
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from engines.base import ToolCallConstraint
from engines.json_budget import TokenCloser, plan_for

CLOSING = "json_closing"  # the extra_args key: {"schema": ..., "sections": [begin, end, lazy, repeat] or None}


def closing_args(schema: dict, calls: ToolCallConstraint | None) -> dict:
    """What a request's `extra_args` carry to the processor (vLLM sends them to its engine process as they are)."""
    sections = None if calls is None else [calls.begin, calls.end, calls.lazy, calls.repeat]
    return {CLOSING: {"schema": schema, "sections": sections}}


class JsonClosingProcessor(AdapterLogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        model = vllm_config.model_config
        self._max_model_len = model.max_model_len
        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer, trust_remote_code=model.trust_remote_code)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer)

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the token

    def new_req_logits_processor(self, params: SamplingParams):
        spec = (params.extra_args or {}).get(CLOSING)
        if spec is None:
            return None
        schema, sections = spec["schema"], spec["sections"]
        plan = plan_for(schema, None if sections is None else ToolCallConstraint(schema, *sections))
        if plan is None:
            return None
        tokenizer = self._tokenizer
        closer = TokenCloser(plan.watch(lambda text: len(tokenizer.tokenize_str(text))), tokenizer)
        most = params.max_tokens or self._max_model_len

        def close(prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            left = min(most, self._max_model_len - len(prompt_ids)) - len(output_ids)
            token = closer.next_token(output_ids, left)
            if token is None or torch.isinf(logits[token]):
                return logits
            forced = torch.full_like(logits, float("-inf"))
            forced[token] = 0.0
            return forced

        return close
