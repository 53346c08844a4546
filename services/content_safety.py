"""Content safety, pluggable: a prompt blocklist checked at submission, and an image-classifier hook.

**Prompt filter.** ``DARKROOM_PROMPT_BLOCKLIST`` (entries separated by commas or newlines) and/or
``DARKROOM_PROMPT_BLOCKLIST_FILE`` (one entry a line, ``#`` comments) list what a prompt may not contain.
Both the prompt and each entry are normalised the same way — NFKC, case folding, invisible format
characters (zero-width spaces and joiners, soft hyphens) removed — so full-width letters, ligatures,
other cases or a hidden zero-width space do not slip past. A plain entry matches whole words only: it may
not touch a letter or digit on either side (``ass`` does not block ``class``), and the words of a phrase
match across any run of spaces or punctuation (``x rated`` also blocks ``x-rated`` and ``x_rated``). An
entry starting with ``re:`` is a Python regular expression searched in the normalised (lower-case) text,
its boundaries its own business. A bad entry (an invalid regex, an entry that normalises to nothing, a
missing file) stops the API at start-up rather than letting every prompt through.

**Image classifier.** ``DARKROOM_IMAGE_CLASSIFIER=package.module:name`` names a callable the worker
imports once at start-up and calls on every generated image: ``classifier(image, request, index)`` with
the decoded image (``PIL.Image.Image``, RGB, exactly the bytes the client would get), the job's normalised
:class:`~schemas.generation.GenerationRequest` (without ``init_image``) and the image's index in the job.
It returns a :class:`Verdict`. Import the model at module level (or lazily, once): the module is imported
once per worker process. This module never imports torch or PIL; the worker does the calling
(``worker/content_check.py``).
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.generation import GenerationRequest
    from services.settings import Settings

REGEX_PREFIX = "re:"
_WORD_SEPARATORS = re.compile(r"[\W_]+")
# Whole words: an entry may not be preceded or followed by a letter or digit (underscore separates).
_BEFORE, _AFTER = r"(?<![^\W_])", r"(?![^\W_])"


class ContentSafetyConfigError(ValueError):
    """The blocklist or classifier setting is unusable; raised at start-up, naming the setting."""


def normalize(text: str) -> str:
    """NFKC, case-folded, without invisible format characters (category Cf): what entries match against."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    visible = "".join(ch for ch in folded if unicodedata.category(ch) != "Cf")
    return unicodedata.normalize("NFKC", visible)


def _term_pattern(entry: str) -> str:
    words = [word for word in _WORD_SEPARATORS.split(normalize(entry)) if word]
    if not words:
        raise ContentSafetyConfigError(f"blocklist entry {entry!r} has no letters or digits")
    return _BEFORE + r"[\W_]+".join(map(re.escape, words)) + _AFTER


@dataclass(frozen=True)
class PromptFilter:
    """Compiled blocklist; :meth:`first_match` is a couple of regex searches, cheap on the event loop."""

    terms: re.Pattern[str] | None = None  # every plain entry, in one alternation
    regexes: tuple[re.Pattern[str], ...] = ()
    size: int = 0
    check_negative_prompt: bool = False

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @classmethod
    def from_entries(cls, entries: Iterable[str], *, check_negative_prompt: bool = False) -> PromptFilter:
        terms, regexes = [], []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            if entry.startswith(REGEX_PREFIX):
                source = entry[len(REGEX_PREFIX) :]
                try:
                    regexes.append(re.compile(source, re.IGNORECASE))
                except re.error as exc:
                    raise ContentSafetyConfigError(f"blocklist regex {source!r} is invalid: {exc}") from None
            else:
                terms.append(_term_pattern(entry))
        unique_terms = list(dict.fromkeys(terms))
        combined = re.compile("|".join(unique_terms)) if unique_terms else None
        return cls(combined, tuple(regexes), len(unique_terms) + len(regexes), check_negative_prompt)

    @classmethod
    def from_settings(cls, settings: Settings) -> PromptFilter:
        """From ``DARKROOM_PROMPT_BLOCKLIST`` and ``DARKROOM_PROMPT_BLOCKLIST_FILE`` (both may be set)."""
        entries: list[str] = []
        if settings.prompt_blocklist:
            entries += re.split(r"[,\n]", settings.prompt_blocklist)
        if settings.prompt_blocklist_file is not None:
            entries += read_blocklist_file(settings.prompt_blocklist_file)
        return cls.from_entries(entries, check_negative_prompt=settings.prompt_filter_negative)

    def first_match(self, text: str) -> str | None:
        """The matched (normalised) text if ``text`` contains a blocked entry, else None."""
        if not self.enabled:
            return None
        normalized = normalize(text)
        if self.terms is not None and (found := self.terms.search(normalized)):
            return found.group()
        for regex in self.regexes:
            if found := regex.search(normalized):
                return found.group()
        return None

    def blocked_field(self, fields: Mapping[str, str | None]) -> tuple[str, str] | None:
        """The first ``(field, matched text)`` among the prompt fields this filter checks, or None."""
        for name, text in fields.items():
            if text and (name != "negative_prompt" or self.check_negative_prompt):
                if (found := self.first_match(text)) is not None:
                    return name, found
        return None

    def check_request(self, request: GenerationRequest) -> tuple[str, str] | None:
        return self.blocked_field({"prompt": request.prompt, "negative_prompt": request.negative_prompt})


def read_blocklist_file(path: Path) -> list[str]:
    """One entry a line; blank lines and lines starting with ``#`` are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContentSafetyConfigError(f"DARKROOM_PROMPT_BLOCKLIST_FILE {str(path)!r}: {exc}") from None
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


# --- the image-classifier hook -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A classifier's answer for one image. ``reason`` (for filtered images) is shown to the client as
    ``filter_reason``: keep it to a category (``"nudity"``), never a score threshold to probe against."""

    allowed: bool
    reason: str | None = None


ALLOWED = Verdict(True)


def filtered(reason: str | None = None) -> Verdict:
    return Verdict(False, reason)


ImageClassifier = Callable[[Any, "GenerationRequest", int], Verdict]
"""``(image: PIL.Image.Image, request, index) -> Verdict``."""


def load_classifier(path: str) -> ImageClassifier:
    """Import ``package.module:attribute`` (the attribute may be dotted) and check it is callable."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ContentSafetyConfigError(f"DARKROOM_IMAGE_CLASSIFIER {path!r} is not 'package.module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ContentSafetyConfigError(f"DARKROOM_IMAGE_CLASSIFIER {path!r} cannot be loaded: {exc}") from exc
    if not callable(target):
        raise ContentSafetyConfigError(f"DARKROOM_IMAGE_CLASSIFIER {path!r} is not callable")
    classifier: ImageClassifier = target
    return classifier
