"""What an English→Arabic translation must keep: checked after every translation round and review edit.

* the number of turns and of MCQA options;
* option letters: every ``A.``/``(B)``/``answer: C`` marker of a turn, in order (Latin or Arabic abjad
  letters ``أ ب ج د`` count as the same letter), so a dropped option or a changed answer letter fails;
* numbers, compared after `bimedix.data.arabic.normalize_arabic` (``٥`` is ``5``, ``٫`` is ``.``);
* protected terms, verbatim: the user's drug list, units written after a number (``mg``, ``mmHg``), and
  Latin-script tokens that are abbreviations or codes (``HbA1c``, ``ECG``, ``CD4``).

`protected_terms` lists what a record must keep; the translation prompt sends that list to the model.
`arabic_option_letters` rewrites a translation's option markers with the Arabic letters of
`bimedix.core.conventions.OPTION_LETTERS`, the letters Arabic training data and evaluation share.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

from ..core.conventions import ANSWER_WORDS, OPTION_LETTERS
from ..data.arabic import normalize_arabic

UNITS = ("mg", "mcg", "µg", "ug", "g", "kg", "ng", "pg", "mL", "ml", "L", "dL", "dl", "mmHg", "cmH2O", "mmol",
         "µmol",
         "mEq", "IU", "U", "units", "bpm", "cm", "mm", "km", "µm", "nm", "°C", "°F", "kcal", "Gy", "mSv",
         "Hz")
_LETTER_INDEX = {letter: i for letters in OPTION_LETTERS.values() for i, letter in enumerate(letters)}
_ALTERNATION = "|".join(sorted(map(re.escape, _LETTER_INDEX), key=len, reverse=True))
_MARKER = re.compile(
    rf"(?:^[ \t]*(?P<line>{_ALTERNATION})[.)][ \t]"
    rf"|\((?P<paren>{_ALTERNATION})\)"
    rf"|(?i:{'|'.join(word for words in ANSWER_WORDS.values() for word in words)})\s*(?:is|:|هي|هو)?\s*"
    rf"(?P<stated>{_ALTERNATION})(?!\w))",
    re.MULTILINE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_UNIT_AFTER_NUMBER = re.compile(
    r"\d\s*(" + "|".join(sorted(map(re.escape, UNITS), key=len, reverse=True))
    + r")(?:/[A-Za-zµ]+)?(?![A-Za-z])")
# a Latin token with two capitals or a letter and a digit (HbA1c, ECG, CD4, B12), hyphen-joined to further
# capitals or digits (COVID-19, IL-6) but not to words (ST-segment keeps only ST)
_CODE_TOKEN = re.compile(r"(?<![A-Za-z0-9-])"
                         r"(?:[A-Za-z]*[A-Z][A-Za-z]*[A-Z0-9][A-Za-z0-9]*|[A-Za-z]+\d[A-Za-z0-9]*)"
                         r"(?:-[A-Z0-9][A-Z0-9]*)*(?![A-Za-z0-9])")
_ARABIC_SEPARATORS = str.maketrans({"٫": ".", "٬": ",", "٪": "%", "،": ","})


def protected_terms(texts: list[str], drug_names: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The Latin-script strings in ``texts`` a translation must copy verbatim, sorted.

    Args:
        texts (`list[str]`): the English turns and options.
        drug_names (`set[str]`, *optional*): names to protect wherever they occur (matched case-insensitively,
            kept as written in the source).
    """
    joined = "\n".join(texts)
    terms = set(_CODE_TOKEN.findall(joined))
    terms.update(match.group(0)[match.start(1) - match.start(0):]
                 for match in _UNIT_AFTER_NUMBER.finditer(joined))
    if drug_names:
        lowered = {name.lower() for name in drug_names}
        terms.update(word for word in re.findall(r"[A-Za-z][A-Za-z-]+", joined) if word.lower() in lowered)
    return sorted(terms)


def check_invariants(source: dict, translation: dict, keep: list[str] | None = None) -> list[str]:
    """Return every invariant ``translation`` breaks (empty when it keeps them all).

    Args:
        source (`dict`): ``{"turns": [...], "options": [...] | None}`` in English.
        translation (`dict`): the same shape in Arabic.
        keep (`list[str]`, *optional*): protected terms (see `protected_terms`).

    Examples:

    ```python
    >>> check_invariants({"turns": ["Give 5 mg."]}, {"turns": ["أعط ٥ mg."]}, ["mg"])
    []
    >>> check_invariants({"turns": ["Answer: B"]}, {"turns": ["الإجابة: C"]})
    ['turn 0: option letters changed from [B] to [C]']

    ```
    """
    problems = []
    pairs = []
    for field in ("turns", "options"):
        src, out = source.get(field) or [], translation.get(field) or []
        if len(src) != len(out):
            problems.append(f"{len(src)} {field} in the source but {len(out)} in the translation")
            continue
        label = "turn" if field == "turns" else "option"
        pairs += [(f"{label} {i}", s, o) for i, (s, o) in enumerate(zip(src, out))]
    for where, src, out in pairs:
        problems += [f"{where}: {problem}" for problem in _check_text(src, out, keep or [])]
    return problems


def arabic_option_letters(text: str) -> str:
    r"""Rewrite the option-letter markers of ``text`` (the ones `check_invariants` compares) with Arabic
    letters.

    Translated MCQA turns then letter their options as the Arabic evaluation tasks and the Arabic converters
    do (`bimedix.core.conventions.OPTION_LETTERS`), whichever letters the translator wrote.

    Examples:

    ```python
    >>> arabic_option_letters("السؤال: ...\nA. إنسولين\nB. ميتفورمين\n\nالإجابة: B")
    'السؤال: ...\nأ. إنسولين\nب. ميتفورمين\n\nالإجابة: ب'

    ```
    """
    def replace(match: re.Match) -> str:
        group = next(name for name in ("line", "paren", "stated") if match.group(name) is not None)
        letter = OPTION_LETTERS["ar"][_LETTER_INDEX[match.group(group)]]
        start, end = match.start(group) - match.start(), match.end(group) - match.start()
        return match.group(0)[:start] + letter + match.group(0)[end:]

    return _MARKER.sub(replace, text)


def _check_text(src: str, out: str, keep: list[str]) -> list[str]:
    problems = []
    src_letters, out_letters = _markers(src), _markers(out)
    if src_letters != out_letters:
        problems.append(f"option letters changed from [{_letters(src_letters)}] to [{_letters(out_letters)}]")
    src_numbers, out_numbers = Counter(_numbers(src)), Counter(_numbers(out))
    missing = src_numbers - out_numbers
    if missing:
        problems.append(f"numbers missing or changed: {sorted(missing.elements())}")
    lost = [term for term in keep if _has_term(src, term) and not _has_term(out, term)]
    if lost:
        problems.append(f"protected terms not kept verbatim: {lost}")
    return problems


def _has_term(text: str, term: str) -> bool:
    """Whether ``term`` occurs in ``text`` as a whole token (``mm`` is not in ``inflammatory``)."""
    return term in text and _term_pattern(term).search(text) is not None


@functools.lru_cache(maxsize=4096)
def _term_pattern(term: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(term)}(?![A-Za-z0-9])")


def _markers(text: str) -> list[int]:
    return [_LETTER_INDEX[match.group("line") or match.group("paren") or match.group("stated")]
            for match in _MARKER.finditer(text)]


def _letters(indices: list[int]) -> str:
    return ", ".join(OPTION_LETTERS["en"][i] for i in indices)


def _numbers(text: str) -> list[str]:
    normalized = normalize_arabic(text).translate(_ARABIC_SEPARATORS)
    return [number.replace(",", "") for number in _NUMBER.findall(normalized)]
