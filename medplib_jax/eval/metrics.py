"""The paper's evaluation metrics, computed as the reference computes them.

Pure Python / NumPy (no JAX): evaluators call these on host values. Reference files mirrored (MedPLIB
`model/eval/`): `glossary.py` (answer normalisation), `evaluate_metrics.py` + LLaVA-Med's `eval_metrics/utils.py`
(precision / recall / F1 / "exact match"), `cal_metric.py` (routing by answer type, means x100, BLEU through nltk),
`cal_metric_omniMedVQA.py` (per-modality accuracy, unweighted mean), `vqa_infer.py: validate_seg` (IoU, Dice,
per-modality means).

Reported numbers (`to_dict()` of the accumulators) are on the paper's x100 scale: open-set precision / recall / F1 /
exact match / BLEU and closed accuracy (Table 1: MeCoVQA-C / -R report precision and recall; recall is the
LLaVA-Med convention's open-set accuracy), OmniMedVQA accuracy per modality and its unweighted mean (Table 1),
mIoU / mDice overall, per modality and per group of modalities (Table 2: the MeCoVQA-G test modalities and the
zero-shot ones). Accumulators hold per-item sums and counts, so evaluators that each score a shard add their
accumulators (`a + b`, `sum(...)`, or `state_dict()` / `from_state_dict()` across processes) and then report.

Where we differ from the reference, on purpose (its crashes are not reproduced):
- `vqa_infer.py: calculate_iou` returns `iou.item()` on the int 0 when the union is empty (an AttributeError);
  we return IoU 0 for an empty union (its evident intent: `iou = 0` in that branch).
- An item whose `answer_type` is neither open nor closed is silently skipped by `cal_metric.py`; the evaluators
  skip such a record too, but count it (a skip row, eval/evaluators.py), and `answer_kind` / `VQAScores.add_item`
  refuse it (ValueError naming the field), so no caller loses an item without a count.
- A mean over zero items (closed accuracy without closed items, OmniMedVQA's mean without modalities, mDice of no
  sample) is `NA` (NaN: "nothing behind it"), where `cal_metric.py` prints 0.0 for an absent kind: reports print
  it as n/a, metrics.json as null (eval/report.py), so a 0.0 is always a real score.
"""
from __future__ import annotations

import collections
import json
import math
import re
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medplib_jax.constants import MASK_THRESHOLD  # the reference's sigmoid threshold (vqa_infer.py validate_seg)

# A metric with nothing behind it (a mean over zero items). NaN keeps `to_dict()` plain floats, which training's
# metric writers log as they are; reports turn it into n/a (report.md) and null (metrics.json).
NA = math.nan


def is_na(value: Any) -> bool:
    """Whether a reported value has nothing behind it: NaN (`NA`, in memory) or None (null, read from JSON)."""
    return value is None or (isinstance(value, float) and math.isnan(value))

# ---------------------------------------------------------------------------------------------------------------
# Answer normalisation (MedPLIB model/eval/glossary.py: normalize_word, itself LLaVA-Med's / the VQA challenge's)
# ---------------------------------------------------------------------------------------------------------------

# The 21 characters of glossary.py's `punctuation` list, in the reference's order (the order matters only through
# `str.replace`).
PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
               '?', '!')
_DIGIT_COMMA_DIGIT = re.compile(r'(\d)(,)(\d)')
# `(?!<=\d)` is a typo for a lookbehind: as written it is a lookahead for the text "<=digit", always true before
# a ".", so the rule is simply "a period not followed by a digit".
_PERIOD = re.compile(r'(?!<=\d)(\.)(?!\d)')
# The reference calls `period_strip.sub("", text, re.UNICODE)`: the flag lands in `count`, so at most 32
# periods are removed per call.
PERIOD_COUNT_LIMIT = int(re.UNICODE)
NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = frozenset({'a', 'an', 'the'})
# Facts 9.2 name the table and one entry (dont -> don't); the rest is LLaVA-Med's `eval_metrics/glossary.py`
# (the VQA challenge's table), which MedPLIB's glossary.py is. Keys with capitals (Id've, Im, Ive, ...) never match:
# the words are lower-cased before the lookup, as in the reference. "somebody'd" -> "somebodyd" is the table's own
# oddity.
CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've",
    'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's",
    'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll", 'somebodys': "somebody's",
    'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas",
    'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't",
    'whatll': "what'll", 'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's",
    'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll",
    'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're",
    'youve': "you've",
}


def _normalize_word(text: str) -> str:
    """glossary.py `normalize_word`: punctuation, periods, number words, articles, contractions, commas."""
    # Every test reads the *original* text: a character is deleted everywhere when the original has it next to a
    # space, or when the original has any digit,digit anywhere; otherwise it becomes a space.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        gone = delete_all or (p + ' ') in text or (' ' + p) in text
        out = out.replace(p, '' if gone else ' ')
    out = _PERIOD.sub('', out, count=PERIOD_COUNT_LIMIT)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return ' '.join(words).replace(',', '')


def normalize_answer(text: str) -> str:
    """An answer as `cal_metric.py` scores it: lower-cased, then glossary.py's `normalize_word`.

    `"Yes, it is."` -> `"yes it is"` (`,` next to a space is deleted), `"x-ray"` -> `"x ray"` (replaced by a space),
    `"1,000"` -> `"1000"` (a digit,digit anywhere deletes all 21 characters), `"3.5"` stays, `"(a)"` -> `""`
    (`(` `)` become spaces, then the article goes), `"Two"` -> `"2"`, `"dont"` -> `"don't"`. At most 32 periods are
    removed (`PERIOD_COUNT_LIMIT`)."""
    return _normalize_word(str(text).lower())


def _word_counts(text: str) -> dict[str, int]:
    """LLaVA-Med `eval_metrics/utils.py: split_sentence(text, 1)`: unigram counts of the whitespace split."""
    return collections.Counter(text.lower().strip().split())


# ---------------------------------------------------------------------------------------------------------------
# Open-set and closed-set VQA (evaluate_metrics.py, cal_metric.py)
# ---------------------------------------------------------------------------------------------------------------

OPEN_ANSWER_TYPES = ('open', 'other', 'number')
CLOSED_ANSWER_TYPES = ('yes/no', 'closed')


def precision_recall_f1(prediction: str, ground_truth: str) -> tuple[float, float, float]:
    """evaluate_metrics.py `calculate_f1score` (returned as (precision, recall, f1)); normalises its inputs again.

    tp sums the *prediction's* counts of the words both sides share, fp the prediction's other words, fn the ground
    truth's words the prediction lacks: precision = tp / (tp + fp), recall = tp / (tp + fn). All 0 when either side
    is empty or nothing is shared. E.g. "liver liver spleen" vs "liver kidney": tp 2, fp 1, fn 1, P = R = 2/3."""
    pred = _word_counts(_normalize_word(prediction))
    gt = _word_counts(_normalize_word(ground_truth))
    if not pred or not gt:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in pred.items() if w in gt)
    if tp == 0:
        return 0.0, 0.0, 0.0
    fp = sum(c for w, c in pred.items() if w not in gt)
    fn = sum(c for w, c in gt.items() if w not in pred)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return precision, recall, 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, ground_truth: str) -> float:
    """evaluate_metrics.py `calculate_exactmatch` (not an exact match at all): the number of *distinct*
    ground-truth words found in the prediction over the prediction's token count; 0 for an empty prediction."""
    pred = _word_counts(_normalize_word(prediction))
    gt = _word_counts(_normalize_word(ground_truth))
    total = sum(pred.values())
    return sum(1 for w in gt if w in pred) / total if total else 0.0


def closed_correct(prediction: str, ground_truth: str) -> bool:
    """cal_metric.py's closed branch: strict equality of the normalised strings (no yes/no or option extraction)."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


# ---------------------------------------------------------------------------------------------------------------
# BLEU: nltk `sentence_bleu` without smoothing (nltk 3.8.1 in the reference's environment), no nltk at run time
# ---------------------------------------------------------------------------------------------------------------

BLEU_WEIGHTS = {
    'bleu': (0.25, 0.25, 0.25, 0.25),  # nltk's default: cumulative 4-gram BLEU
    'bleu_1': (1, 0, 0, 0),  # cal_metric.py's bleu_score_1..3: a single n-gram order each, not cumulative
    'bleu_2': (0, 1, 0, 0),
    'bleu_3': (0, 0, 1, 0),
}


def _clipped_ngram_counts(references: Sequence[Sequence[str]], hypothesis: Sequence[str], n: int
                          ) -> tuple[int, int]:
    """nltk `modified_precision` as (numerator, denominator): hypothesis n-gram counts clipped by the largest
    count in any one reference; the denominator is at least 1."""
    def grams(tokens):
        return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    counts = grams(hypothesis)
    max_ref = collections.Counter()
    for ref in references:
        for g, c in grams(ref).items():
            max_ref[g] = max(max_ref[g], c)
    return sum(min(c, max_ref[g]) for g, c in counts.items()), max(1, sum(counts.values()))


def sentence_bleu(references: Sequence[Sequence[str]], hypothesis: Sequence[str],
                  weights: Sequence[float] = BLEU_WEIGHTS['bleu']) -> float:
    """nltk.translate.bleu_score.sentence_bleu(references, hypothesis, weights), no smoothing, no auto re-weigh.

    Exactly 0 when no unigram matches (or the hypothesis is empty). An n-gram order without a match enters as
    `sys.float_info.min` (nltk's method0), so with a positive weight the score is tiny but not 0 (e.g. about 1e-231
    for the default weights when no bigram matches): nltk's own value, 0 to any printed precision."""
    hypothesis, references = list(hypothesis), [list(r) for r in references]
    fractions = [_clipped_ngram_counts(references, hypothesis, n) for n in range(1, len(weights) + 1)]
    if fractions[0][0] == 0:
        return 0.0
    precisions = [num / den if num else sys.float_info.min for num, den in fractions]
    hyp_len = len(hypothesis)
    ref_len = min((len(r) for r in references), key=lambda r: (abs(r - hyp_len), r))
    brevity = 1 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(math.fsum(w * math.log(p) for w, p in zip(weights, precisions) if p > 0))


def open_set_scores(prediction: str, ground_truth: str) -> dict[str, float]:
    """One open-set item as cal_metric.py scores it (fractions, not x100).

    Both texts are normalised once (`normalize_answer`); precision / recall / f1 / exact_match normalise them a
    second time inside (as evaluate_metrics.py does; this matters only beyond 32 periods); BLEU compares the
    once-normalised whitespace tokens."""
    pred, gt = normalize_answer(prediction), normalize_answer(ground_truth)
    precision, recall, f1 = precision_recall_f1(pred, gt)
    scores = dict(precision=precision, recall=recall, f1=f1, exact_match=exact_match(pred, gt))
    for name, weights in BLEU_WEIGHTS.items():
        scores[name] = sentence_bleu([gt.lower().split()], pred.lower().split(), weights)
    return scores


def answer_kind(answer_type: str) -> str:
    """cal_metric.py's routing: 'open' for open / other / number, 'closed' for yes/no / closed (case-insensitive)."""
    kind = str(answer_type).lower()
    if kind in OPEN_ANSWER_TYPES:
        return 'open'
    if kind in CLOSED_ANSWER_TYPES:
        return 'closed'
    raise ValueError(f'answer_type={answer_type!r}: expected one of {OPEN_ANSWER_TYPES + CLOSED_ANSWER_TYPES}')


# ---------------------------------------------------------------------------------------------------------------
# Segmentation (vqa_infer.py: validate_seg, calculate_iou)
# ---------------------------------------------------------------------------------------------------------------



def binarize_logits(logits: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """`sigmoid(logits) > threshold` in float32 (the reference thresholds torch.sigmoid of the mask logits)."""
    x = np.asarray(logits, np.float32)
    with np.errstate(over='ignore'):
        return 1.0 / (1.0 + np.exp(-x)) > np.float32(threshold)


def binarize_probabilities(probabilities: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """For masks already passed through the sigmoid: `probabilities > threshold`."""
    return np.asarray(probabilities) > threshold


def mask_iou(prediction: np.ndarray | None, ground_truth: np.ndarray) -> float:
    """|P & G| / |P | G| of two binary masks (bool, or integers read as nonzero = in), as `calculate_iou`.

    0 for a missing prediction (None: no mask produced) and for an empty union (see the module docstring). The
    division is in float32, as torch's `.float() / .float()`. Float masks are refused: binarise them first."""
    gt = np.asarray(ground_truth)
    if prediction is None:
        return 0.0
    pred = np.asarray(prediction)
    for name, m in (('prediction', pred), ('ground_truth', gt)):
        if np.issubdtype(m.dtype, np.floating):
            raise ValueError(f'mask_iou: {name} is {m.dtype}; pass a binary mask (binarize_logits / '
                             'binarize_probabilities)')
    if pred.shape != gt.shape:
        raise ValueError(f'mask_iou: prediction shape {pred.shape} != ground_truth shape {gt.shape}')
    pred, gt = pred.astype(bool), gt.astype(bool)
    union = int(np.logical_or(pred, gt).sum())
    if union == 0:
        return 0.0
    return float(np.float32(np.logical_and(pred, gt).sum()) / np.float32(union))


def dice_from_iou(iou: float) -> float:
    """vqa_infer.py's Dice: 2 IoU / (1 + IoU), equal to the per-image 2|P&G| / (|P|+|G|)."""
    return 2 * iou / (1 + iou)


def seg_modality(image_path: str) -> str:
    """vqa_infer.py: the file name's text before its first '_' (SA-Med2D naming).

    `images/ct_00--AbdomenCT1K--Case_00220--x_0359.png` -> `ct`; `x_ray--Chest_Image_Pneum--...` -> `x`."""
    return str(image_path).split('/')[-1].split('_')[0]


# Table 2's columns as `seg_modality` keys. MeCoVQA-G test: Der, CT, PET; zero-shot: X-Ray, End(oscopy), MR, US,
# FP (fundus photography). `ct`, `dermoscopy`, `ultrasound`, `x` follow from the MeCoVQA-G test file's image
# names; `pet`, `mr`, `endoscopy`, `fundus` are the SA-Med2D prefixes as third-party code lists them [verify
# against the released test files]. A group's mean is the unweighted mean over its modalities, as Table 2's "Mean"
# columns are (MedPLIB zero-shot: (28.25 + 44.19 + 27.52 + 35.64 + 25.76) / 5 = 32.27).
PAPER_SEG_GROUPS: dict[str, tuple[str, ...]] = {
    'mecovqa_g': ('dermoscopy', 'ct', 'pet'),
    'zero_shot': ('x', 'endoscopy', 'mr', 'ultrasound', 'fundus'),
}


def omnimedvqa_image_key(image_path: str) -> str:
    """cal_metric_omniMedVQA.py's key into the `QA_information/Open-access/*.json` `image_path` -> `modality_type`
    map: the path after `OmniMedVQA/`."""
    return str(image_path).split('OmniMedVQA')[-1][1:]


def unweighted_mean(values: Iterable[float]) -> float:
    """The mean over modalities that OmniMedVQA's `mean acc` and Table 2's "Mean" columns report (`NA` if none)."""
    values = list(values)
    return sum(values) / len(values) if values else NA


# ---------------------------------------------------------------------------------------------------------------
# Accumulators: per-item sums and counts that shards add up
# ---------------------------------------------------------------------------------------------------------------

class MetricSums:
    """Per-key sums and counts of per-item values.

    Shards add (`a + b`, `sum([...])`), or cross processes as `state_dict()` (plain JSON) and `from_state_dict()`;
    `to_dict()` turns the totals into the reported numbers. Subclasses add items and define `to_dict()`."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = collections.defaultdict(float)
        self.counts: dict[str, int] = collections.defaultdict(int)

    def add(self, key: str, value: float) -> None:
        self.sums[key] += float(value)
        self.counts[key] += 1

    def mean(self, key: str) -> float:
        """The mean of `key`'s items, `NA` when there are none (cal_metric.py prints 0.0 for an absent kind; a 0.0
        here is always a score)."""
        n = self.counts.get(key, 0)
        return self.sums[key] / n if n else NA

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return sorted(k[len(prefix):] for k in self.counts if k.startswith(prefix))

    def __add__(self, other: 'MetricSums') -> 'MetricSums':
        if type(other) is not type(self):
            return NotImplemented
        out = type(self)()
        for part in (self, other):
            for k, v in part.sums.items():
                out.sums[k] += v
            for k, n in part.counts.items():
                out.counts[k] += n
        return out

    def __radd__(self, other: Any) -> 'MetricSums':
        return self if other == 0 else self.__add__(other)  # sum() starts from 0

    def state_dict(self) -> dict[str, dict]:
        return {'sums': dict(self.sums), 'counts': dict(self.counts)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Mapping]) -> 'MetricSums':
        out = cls()
        out.sums.update({k: float(v) for k, v in state['sums'].items()})
        out.counts.update({k: int(v) for k, v in state['counts'].items()})
        return out

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), sort_keys=True)

    def to_dict(self) -> dict[str, float]:
        raise NotImplementedError


class VQAScores(MetricSums):
    """cal_metric.py over a file of items: open items -> precision, recall, f1, exact_match, bleu, bleu_1..3;
    closed items -> accuracy. `to_dict()`: `open/<metric>` and `closed/accuracy` (means x100; `NA` when the kind has
    no items), `open/count`, `closed/count`. The optional `--candidate_set` "open accuracy" is not
    implemented."""

    def add_item(self, prediction: str, ground_truth: str, answer_type: str) -> dict[str, float]:
        """Score one item, add it, and return its scores (fractions)."""
        if answer_kind(answer_type) == 'open':
            scores = open_set_scores(prediction, ground_truth)
            for k, v in scores.items():
                self.add(f'open/{k}', v)
            return scores
        scores = {'accuracy': float(closed_correct(prediction, ground_truth))}
        self.add('closed/accuracy', scores['accuracy'])
        return scores

    def to_dict(self) -> dict[str, float]:
        out = {f'open/{k}': 100 * self.mean(f'open/{k}')
               for k in ('precision', 'recall', 'f1', 'exact_match', *BLEU_WEIGHTS)}
        out['closed/accuracy'] = 100 * self.mean('closed/accuracy')
        out['open/count'] = float(self.counts.get('open/recall', 0))
        out['closed/count'] = float(self.counts.get('closed/accuracy', 0))
        return out


class OmniMedVQAScores(MetricSums):
    """cal_metric_omniMedVQA.py: closed-set accuracy per `modality_type`. `to_dict()`: `accuracy/<modality>` (x100),
    `mean_accuracy` (the unweighted mean over modalities, the paper's "Mean"), `count/<modality>`, `count`.

    Every item is scored closed: vqa_infer.py writes `answer_type` from its CLI, `closed` by default, and the
    reference's per-modality table holds only the closed branch. The modality comes from the caller (the
    `modality_type` of the QA file entry, looked up by `omnimedvqa_image_key`)."""

    def add_item(self, prediction: str, ground_truth: str, modality: str) -> bool:
        hit = closed_correct(prediction, ground_truth)
        self.add(f'accuracy/{modality}', float(hit))
        return hit

    def to_dict(self) -> dict[str, float]:
        modalities = self.keys_with_prefix('accuracy/')
        out = {f'accuracy/{m}': 100 * self.mean(f'accuracy/{m}') for m in modalities}
        out['mean_accuracy'] = unweighted_mean(out[f'accuracy/{m}'] for m in modalities)
        out.update({f'count/{m}': float(self.counts[f'accuracy/{m}']) for m in modalities})
        out['count'] = float(sum(self.counts[f'accuracy/{m}'] for m in modalities))
        return out


class SegScores(MetricSums):
    """vqa_infer.py `validate_seg`: per-sample IoU and Dice (first ground-truth mask against the first predicted
    one, chosen by the caller), averaged overall (`miou`, `mdice`) and per `seg_modality` (`iou/<m>`, `dice/<m>`),
    plus, for each group of `groups` (default: Table 2's) with at least one modality present, the unweighted mean
    over its present modalities (`<group>/mdice`, `<group>/miou`) and how many were present
    (`<group>/modalities`). All x100 but the counts."""

    def __init__(self, groups: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        self.groups = dict(PAPER_SEG_GROUPS if groups is None else groups)

    def __add__(self, other: 'MetricSums') -> 'MetricSums':
        out = super().__add__(other)
        if out is not NotImplemented:
            out.groups = self.groups
        return out

    def add_iou(self, iou: float, modality: str) -> None:
        dice = dice_from_iou(iou)
        for key, value in (('iou', iou), ('dice', dice)):
            self.add(key, value)
            self.add(f'{key}/{modality}', value)

    def add_item(self, prediction: np.ndarray | None, ground_truth: np.ndarray, image_path: str) -> float:
        """Add one sample (binary masks; `prediction=None` when no mask was produced) and return its IoU."""
        iou = mask_iou(prediction, ground_truth)
        self.add_iou(iou, seg_modality(image_path))
        return iou

    def to_dict(self) -> dict[str, float]:
        out = {'miou': 100 * self.mean('iou'), 'mdice': 100 * self.mean('dice'),
               'count': float(self.counts.get('iou', 0))}
        modalities = self.keys_with_prefix('iou/')
        for m in modalities:
            out[f'iou/{m}'] = 100 * self.mean(f'iou/{m}')
            out[f'dice/{m}'] = 100 * self.mean(f'dice/{m}')
            out[f'count/{m}'] = float(self.counts[f'iou/{m}'])
        for group, members in self.groups.items():
            present = [m for m in members if m in modalities]
            if present:
                out[f'{group}/mdice'] = unweighted_mean(out[f'dice/{m}'] for m in present)
                out[f'{group}/miou'] = unweighted_mean(out[f'iou/{m}'] for m in present)
                out[f'{group}/modalities'] = float(len(present))
        return out
