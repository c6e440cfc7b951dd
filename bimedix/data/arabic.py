"""Arabic text normalisation for comparisons (dedup, decontamination, invariant checks).

Two strings that a reader sees as the same question often differ in bytes: diacritics (tashkeel),
tatweel, the four alef forms, alef maqsura vs. yaa, and Arabic-Indic digits (``٥`` for ``5``).
`normalize_arabic` removes those differences and nothing else; `normalize_for_match` also folds case,
Unicode compatibility forms, punctuation and whitespace, for n-gram and MinHash matching in either
language. Neither is meant for text a model is trained on: keep the original for that.
"""

from __future__ import annotations

import re
import unicodedata

_DIACRITICS = re.compile("[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06dc\u06df-\u06e8\u06ea-\u06ed\u0640]")
_LETTERS_AND_DIGITS = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي",
                                     **{c: str(unicodedata.digit(c)) for c in "٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹"}})
_NOT_WORD = re.compile(r"[^\w]+|_+")


def normalize_arabic(text: str) -> str:
    """Remove Arabic spelling variation that does not change meaning.

    Strips diacritics (tashkeel, Quranic marks) and tatweel, maps ``أ إ آ ٱ`` to ``ا`` and alef maqsura
    ``ى`` to ``ي``, and Arabic-Indic / Persian digits to ``0``–``9``. Latin text passes through unchanged.

    Args:
        text (`str`): any text.

    Returns:
        `str`: the normalised text.

    Examples:

    ```python
    >>> normalize_arabic("مُسْتَشْفَى ٥")
    'مستشفي 5'

    ```
    """
    if text.isascii():
        return text
    return _DIACRITICS.sub("", text).translate(_LETTERS_AND_DIGITS)


def normalize_for_match(text: str) -> str:
    """Normalise text for matching: NFKC, `normalize_arabic`, case folding, no punctuation, single spaces.

    Args:
        text (`str`): any text, English or Arabic.

    Returns:
        `str`: space-separated lower-case words; punctuation (including ``، ؛ ؟``) becomes a space.

    Examples:

    ```python
    >>> normalize_for_match("What is the DOSE of  Aspirin? (5 mg)")
    'what is the dose of aspirin 5 mg'

    ```
    """
    if not text.isascii():
        text = normalize_arabic(unicodedata.normalize("NFKC", text))
    text = text.casefold()
    return " ".join(_NOT_WORD.sub(" ", text).split())
