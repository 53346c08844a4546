"""Counting prompt tokens the way the pipeline will see them, to warn before text is silently cut off.

SD3 reads a prompt three times: two CLIP encoders that stop at 77 tokens (start/end tokens included) and T5,
which reads ``max_sequence_length`` tokens. diffusers truncates without a word; clients deserve to know.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from schemas.generation import GenerationRequest

# SD3.5-Medium was trained with 256 T5 tokens; longer prompts are accepted (up to 512) but may drift.
T5_TRAINED_TOKENS = 256


@dataclass(frozen=True)
class TokenCounts:
    clip: int
    clip_limit: int
    t5: int | None  # None when the worker runs without T5
    t5_limit: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, truncation=False, add_special_tokens=True, verbose=False)["input_ids"])


def count_tokens(pipeline: Any, text: str, max_sequence_length: int) -> TokenCounts:
    clip_tokenizer = pipeline.tokenizer
    t5_tokenizer = getattr(pipeline, "tokenizer_3", None)
    has_t5 = t5_tokenizer is not None and getattr(pipeline, "text_encoder_3", None) is not None
    return TokenCounts(
        clip=_count(clip_tokenizer, text),
        clip_limit=int(clip_tokenizer.model_max_length),
        t5=_count(t5_tokenizer, text) if has_t5 else None,
        t5_limit=max_sequence_length,
    )


def truncation_warnings(name: str, counts: TokenCounts) -> list[str]:
    warnings = []
    if counts.clip > counts.clip_limit:
        warnings.append(
            f"{name} is {counts.clip} CLIP tokens; the CLIP encoders read only the first {counts.clip_limit}"
            + ("" if counts.t5 is not None else " and this worker has no T5 encoder: the rest is ignored")
        )
    if counts.t5 is not None:
        if counts.t5 > counts.t5_limit:
            warnings.append(
                f"{name} is {counts.t5} T5 tokens; only the first {counts.t5_limit} are read "
                "(max_sequence_length, up to 512)"
            )
        elif counts.t5 > T5_TRAINED_TOKENS:
            warnings.append(
                f"{name} is {counts.t5} T5 tokens, more than the {T5_TRAINED_TOKENS} "
                "SD3.5-Medium was trained "
                "with; results may drift"
            )
    return warnings


def prompt_report(pipeline: Any, request: GenerationRequest) -> tuple[dict[str, Any], list[str]]:
    """Token counts of prompt and negative prompt, and the warnings they call for."""
    counts = {"prompt": count_tokens(pipeline, request.prompt, request.max_sequence_length)}
    if request.negative_prompt:
        counts["negative_prompt"] = count_tokens(
            pipeline, request.negative_prompt, request.max_sequence_length
        )
    warnings = [w for name, c in counts.items() for w in truncation_warnings(name, c)]
    return {name: c.as_dict() for name, c in counts.items()}, warnings
