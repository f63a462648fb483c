"""The paper's metrics (medplib_jax/eval/metrics.py) on hand-worked cases, and BLEU against nltk itself.

Every expected value below is worked out by hand in the comment beside it from the reference's rules
(glossary.py, evaluate_metrics.py, cal_metric.py, vqa_infer.py), not computed by the project. BLEU is checked against
`nltk.translate.bleu_score.sentence_bleu` on fresh random sentences (relative tolerance 1e-12: the same
float operations in the same order, so in practice the values are equal). No JAX here.
"""
import json
import math
import os
import sys
import warnings

import numpy as np
import pytest
from nltk.translate import bleu_score as nltk_bleu  # the independent reference (setup.cfg's test extra)

from medplib_jax.eval import metrics as M

# --- normalisation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('text, expected', [
    # ',' is in the original next to a space -> deleted; the final '.' is not before a digit -> removed.
    ('yes, it is.', 'yes it is'),
    ('Yes, It is.', 'yes it is'),  # lower-cased first
    # '1,0' is a digit,digit pattern -> every one of the 21 characters is deleted (not replaced) -> '1000'.
    ('1,000', '1000'),
    # no digit,digit and ',' not next to a space -> replaced by a space: '1 a'; then the article 'a' goes.
    ('1,a', '1'),
    # a period before a digit stays; a trailing one goes.
    ('3.5', '3.5'),
    ('3.5.', '3.5'),
    # '-' between letters and nowhere next to a space -> replaced by a space.
    ('left-sided', 'left sided'),
    # '-' next to a space somewhere in the original -> deleted everywhere, also inside 'x-ray' -> 'xray'.
    ('x-ray - left', 'xray left'),
    # '(' and ')' touch no space -> spaces: ' a ' -> the article 'a' is dropped -> empty.
    ('(a)', ''),
    ('(b)', 'b'),
    # ')' is followed by a space -> deleted: 'a ct' -> 'ct' (no option-letter extraction, the article rule eats it).
    ('A) CT', 'ct'),
    # Adjacency is read on the ORIGINAL text: '(' becomes a space first, but '-' was next to no space in the
    # original, so both '-' become spaces: 'x  y a b' -> 'x y b'. (Reading the modified text would see ' -' and
    # delete both, giving 'x y ab'.)
    ('x(-y a-b', 'x y b'),
    # number words -> digits (none/zero..ten only), then articles go.
    ('None of the two', '0 of 2'),
    ('ten eleven', '10 eleven'),
    # articles a / an / the dropped, other short words kept.
    ('The liver and an organ', 'liver and organ'),
    # contractions: 'dont' -> "don't", 'isnt' -> "isn't"; the table's capitalised 'Im' never matches after
    # lower-casing, so 'im' stays; an existing "doesn't" is untouched (the apostrophe is not one of the 21).
    ("dont Im isnt doesn't", "don't im isn't doesn't"),
    ('', ''),
])
def test_normalize_answer_hand_cases(text, expected):
    assert M.normalize_answer(text) == expected


@pytest.mark.parametrize('p', M.PUNCTUATION)
def test_each_of_the_21_characters_replaced_or_deleted(p):
    # 'u{p}v' has p next to no space -> 'u v'; 'u{p}v {p}' has ' p' -> p deleted everywhere -> 'uv'.
    assert M.normalize_answer(f'u{p}v') == 'u v'
    assert M.normalize_answer(f'u{p}v {p}') == 'uv'
    assert len(M.PUNCTUATION) == 21


def test_period_rule_count_limit():
    # re.UNICODE (32) passed positionally is sub's count: 40 words 'w.' keep their last 8 periods after one pass.
    text = ' '.join(['w.'] * 40)
    assert M.PERIOD_COUNT_LIMIT == 32
    assert M.normalize_answer(text) == ' '.join(['w'] * 32 + ['w.'] * 8)
    # Closed equality uses one pass, so this is not equal to 40 plain 'w's ...
    assert not M.closed_correct(text, ' '.join(['w'] * 40))
    # ... while precision/recall normalise a second time (evaluate_metrics.py), which removes the other 8:
    # pred = 40 x 'w', gt = 'w': tp = 40 (the prediction's count), fp = fn = 0 -> P = R = F1 = 1; exact match =
    # 1 distinct gt word / 40 pred tokens.
    scores = M.open_set_scores(text, 'w')
    assert scores['precision'] == scores['recall'] == scores['f1'] == 1.0
    assert scores['exact_match'] == 1 / 40


# --- open and closed metrics -----------------------------------------------------------------------------------

def test_open_recall_uses_the_predictions_counts():
    # pred 'liver liver spleen' vs gt 'liver kidney': tp = count_pred(liver) = 2, fp = 1 (spleen), fn = 1 (kidney)
    # -> P = 2/3, R = 2/(2+1) = 2/3 (a min-count recall would be 1/2), F1 = 2/3; exact match = 1 distinct gt word
    # present / 3 pred tokens = 1/3.
    p, r, f = M.precision_recall_f1('liver liver spleen', 'liver kidney')
    assert (p, r, f) == pytest.approx((2 / 3, 2 / 3, 2 / 3), abs=1e-15)
    assert M.exact_match('liver liver spleen', 'liver kidney') == pytest.approx(1 / 3, abs=1e-15)
    # pred 'liver liver liver' vs 'liver kidney': tp 3, fp 0, fn 1 -> P = 1, R = 3/4, F1 = 2*.75/1.75 = 6/7.
    p, r, f = M.precision_recall_f1('liver liver liver', 'liver kidney')
    assert (p, r, f) == pytest.approx((1.0, 0.75, 6 / 7), abs=1e-15)


def test_open_metrics_normalise_before_counting():
    # 'The Liver, enlarged.' -> 'liver enlarged'; 'an enlarged liver' -> 'enlarged liver': tp 2, fp 0, fn 0.
    assert M.precision_recall_f1('The Liver, enlarged.', 'an enlarged liver') == (1.0, 1.0, 1.0)


@pytest.mark.parametrize('pred, gt', [('', 'liver'), ('the', 'liver'), ('liver', ''), ('liver', 'a'),
                                      ('spleen', 'liver')])
def test_open_metrics_zero_for_empty_side_or_no_overlap(pred, gt):
    # An empty side (also one that normalises to empty: 'the', 'a') or no shared word -> all 0; BLEU 0 (no
    # unigram match) and exact match 0 (0 gt words found, or an empty prediction).
    scores = M.open_set_scores(pred, gt)
    assert scores == {k: 0.0 for k in scores}
    assert set(scores) == {'precision', 'recall', 'f1', 'exact_match', 'bleu', 'bleu_1', 'bleu_2', 'bleu_3'}


def test_closed_is_strict_equality_after_normalisation():
    assert M.closed_correct('Yes.', 'yes')            # 'yes' == 'yes'
    assert M.closed_correct('The Left Kidney', 'left kidney')
    assert not M.closed_correct('yes, it is', 'yes')  # no yes/no extraction
    assert not M.closed_correct('A', 'A) CT')         # no option letters: '' != 'ct'
    assert M.closed_correct('1,000', '1000')


@pytest.mark.parametrize('answer_type, kind', [('open', 'open'), ('OTHER', 'open'), ('number', 'open'),
                                               ('yes/no', 'closed'), ('CLOSED', 'closed')])
def test_routing_by_answer_type(answer_type, kind):
    assert M.answer_kind(answer_type) == kind


def test_unknown_answer_type_is_a_clear_error():
    # The evaluators skip and count such a record (tests/test_evaluators.py); the accumulator itself refuses it, so
    # no caller loses an item without a count.
    with pytest.raises(ValueError, match=r"answer_type='choice'"):
        M.VQAScores().add_item('a', 'b', 'choice')


def test_vqa_scores_by_hand():
    acc = M.VQAScores()
    acc.add_item('liver liver spleen', 'liver kidney', 'open')  # P 2/3, R 2/3, F1 2/3, EM 1/3
    acc.add_item('liver', 'liver', 'open')                       # P = R = F1 = EM = 1, BLEU-1 = 1
    acc.add_item('Yes.', 'yes', 'closed')                        # hit
    acc.add_item('no', 'yes', 'yes/no')                          # miss
    acc.add_item('No', 'no', 'CLOSED')                           # hit
    out = acc.to_dict()
    # means x100: P = R = F1 = (2/3 + 1)/2 = 5/6 -> 83.33; EM (1/3 + 1)/2 = 2/3 -> 66.67; closed 2/3 -> 66.67.
    assert out['open/precision'] == pytest.approx(250 / 3)
    assert out['open/recall'] == pytest.approx(250 / 3)
    assert out['open/f1'] == pytest.approx(250 / 3)
    assert out['open/exact_match'] == pytest.approx(200 / 3)
    assert out['closed/accuracy'] == pytest.approx(200 / 3)
    assert out['open/count'] == 2 and out['closed/count'] == 3
    # BLEU-1 of item 1: clipped unigrams liver(min(2,1)) = 1 of 3 -> 1/3; hyp 3 > ref 2 -> no brevity penalty.
    # Item 2: 1/1, hyp 1 == ref 1 -> bp exp(0) = 1. Mean (1/3 + 1)/2 = 2/3.
    assert out['open/bleu_1'] == pytest.approx(200 / 3)


def test_a_mean_over_nothing_is_na_not_zero():
    """cal_metric.py prints 0.0 for an absent kind; here it is NA (NaN), which reports print as n/a, so a 0.0 is
    always a score. Counts stay 0."""
    closed_only = M.VQAScores()
    closed_only.add_item('no', 'yes', 'closed')  # a real 0: one closed item, missed
    out = closed_only.to_dict()
    assert out['closed/accuracy'] == 0.0 and out['closed/count'] == 1 and out['open/count'] == 0
    for key in ('precision', 'recall', 'f1', 'exact_match', 'bleu', 'bleu_1', 'bleu_2', 'bleu_3'):
        assert math.isnan(out[f'open/{key}']) and M.is_na(out[f'open/{key}']), key
    open_only = M.VQAScores()
    open_only.add_item('liver', 'liver', 'open')
    assert math.isnan(open_only.to_dict()['closed/accuracy']) and open_only.to_dict()['open/recall'] == 100.0
    omni = M.OmniMedVQAScores().to_dict()
    assert math.isnan(omni['mean_accuracy']) and omni['count'] == 0
    seg = M.SegScores().to_dict()
    assert math.isnan(seg['mdice']) and math.isnan(seg['miou']) and seg['count'] == 0
    assert math.isnan(M.unweighted_mean([])) and M.unweighted_mean([0.0]) == 0.0
    assert M.is_na(None) and not M.is_na(0.0) and not M.is_na(0)


# --- OmniMedVQA ------------------------------------------------------------------------------------------------

def test_omnimedvqa_unweighted_mean_over_modalities():
    acc = M.OmniMedVQAScores()
    for pred, gt in [('Glaucoma', 'glaucoma'), ('normal', 'normal'), ('normal', 'glaucoma')]:
        acc.add_item(pred, gt, 'Fundus Photography')                 # 2/3
    acc.add_item('Pneumonia.', 'pneumonia', 'X-Ray')                 # 1/1
    out = acc.to_dict()
    assert out['accuracy/Fundus Photography'] == pytest.approx(200 / 3)
    assert out['accuracy/X-Ray'] == 100.0
    # unweighted: (66.67 + 100) / 2 = 83.33, not the pooled 3/4 = 75.
    assert out['mean_accuracy'] == pytest.approx(250 / 3)
    assert out['count'] == 4 and out['count/X-Ray'] == 1


def test_unweighted_mean_reproduces_the_papers_mean_columns():
    # Table 1, MedPLIB's OmniMedVQA row (CT MR OCT Der MIC X-Ray FP US) -> Mean 60.58.
    assert round(M.unweighted_mean([62.70, 66.97, 75.05, 51.47, 64.40, 60.25, 65.04, 38.75]), 2) == 60.58
    # Table 2, MedPLIB: MeCoVQA-G (Der CT PET) -> 68.11; zero-shot (X-Ray End MR US FP) -> 32.27.
    assert round(M.unweighted_mean([79.90, 59.83, 64.59]), 2) == 68.11
    assert round(M.unweighted_mean([28.25, 44.19, 27.52, 35.64, 25.76]), 2) == 32.27


def test_omnimedvqa_image_key():
    # cal_metric_omniMedVQA.py: the part after 'OmniMedVQA', without its leading '/'.
    assert M.omnimedvqa_image_key('/data/OmniMedVQA/Images/ACRIMA/Im001.png') == 'Images/ACRIMA/Im001.png'


# --- segmentation ----------------------------------------------------------------------------------------------

def test_binarize_at_sigmoid_point_one():
    # logit(0.1) = ln(1/9) = -2.197: sigmoid(-2.2) = 1/(1+e^2.2) = 0.0998 -> out; sigmoid(-2.19) = 0.1007 -> in.
    assert M.binarize_logits(np.array([-50.0, -2.2, -2.19, 0.0, 50.0])).tolist() == [False, False, True, True, True]
    assert M.binarize_probabilities(np.array([0.1, 0.11])).tolist() == [False, True]


def test_iou_and_dice_by_hand():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    gt = np.array([[1, 0, 0], [0, 1, 1]], np.uint8)
    # intersection {(0,0), (1,1)} = 2, union 4 -> IoU 1/2; Dice 2(1/2)/(3/2) = 2/3 = 2*2/(3+3).
    assert M.mask_iou(pred, gt) == 0.5
    assert M.dice_from_iou(0.5) == pytest.approx(2 / 3)


def test_iou_zero_for_empty_union_and_missing_mask():
    empty = np.zeros((4, 4), bool)
    assert M.mask_iou(empty, empty) == 0.0           # empty union -> 0 (the reference's stated rule)
    assert M.mask_iou(None, np.ones((4, 4), bool)) == 0.0  # no mask produced -> 0


def test_iou_refuses_float_masks_and_shape_mismatch():
    with pytest.raises(ValueError, match='binarize'):
        M.mask_iou(np.full((2, 2), 0.7), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match='shape'):
        M.mask_iou(np.ones((2, 3), bool), np.ones((3, 2), bool))


@pytest.mark.parametrize('path, modality', [
    ('images/ct_00--AbdomenCT1K--Case_00220--x_0359.png', 'ct'),
    ('/data/SAMed2Dv1/images/dermoscopy_00--isic2018_task1--ISIC_0014156--2d_none.png', 'dermoscopy'),
    ('ultrasound_00--ultrasound_nerve_segmentation--19_3--2d_none.png', 'ultrasound'),
    ('images/x_ray--Chest_Image_Pneum--abc--2d_none.png', 'x'),  # X-ray has no sub-id: prefix 'x'
])
def test_modality_from_file_name(path, modality):
    assert M.seg_modality(path) == modality


def test_mdice_perfect_and_empty_predictions():
    rng = np.random.default_rng()
    perfect, empty = M.SegScores(), M.SegScores()
    for i in range(4):
        gt = rng.random((8, 9)) > 0.5
        gt[0, 0] = True  # non-empty truth
        perfect.add_item(gt.copy(), gt, f'images/ct_00--d--c{i}--x_0001.png')
        empty.add_item(np.zeros_like(gt), gt, f'images/ct_00--d--c{i}--x_0001.png')
    # IoU 1 -> Dice 2/2 = 1 per sample -> mDice 1.0 (100 on the reported x100 scale).
    assert perfect.mean('dice') == 1.0 and perfect.to_dict()['mdice'] == 100.0
    # empty prediction vs non-empty truth: intersection 0 -> IoU 0 -> Dice 0.
    assert empty.mean('dice') == 0.0 and empty.to_dict()['mdice'] == 0.0


def test_seg_scores_per_modality_and_paper_groups():
    acc = M.SegScores()
    acc.add_iou(0.5, 'ct')   # Dice 2/3
    acc.add_iou(1.0, 'ct')   # Dice 1
    acc.add_iou(0.0, 'x')    # Dice 0
    acc.add_iou(1 / 3, 'mr')  # Dice (2/3)/(4/3) = 1/2
    out = acc.to_dict()
    # overall per-sample means: IoU (0.5 + 1 + 0 + 1/3)/4 = 11/24; Dice (2/3 + 1 + 0 + 1/2)/4 = 13/24.
    assert out['miou'] == pytest.approx(1100 / 24)
    assert out['mdice'] == pytest.approx(1300 / 24)
    # per modality: ct Dice (2/3 + 1)/2 = 5/6; x 0; mr 1/2.
    assert out['dice/ct'] == pytest.approx(500 / 6) and out['count/ct'] == 2
    # groups: MeCoVQA-G has only ct present -> 83.33 over 1 modality; zero-shot x, mr -> (0 + 50)/2 = 25 over 2.
    assert out['mecovqa_g/mdice'] == pytest.approx(500 / 6) and out['mecovqa_g/modalities'] == 1
    assert out['zero_shot/mdice'] == pytest.approx(25.0) and out['zero_shot/modalities'] == 2
    assert M.PAPER_SEG_GROUPS == {'mecovqa_g': ('dermoscopy', 'ct', 'pet'),
                                  'zero_shot': ('x', 'endoscopy', 'mr', 'ultrasound', 'fundus')}


# --- accumulating over shards ----------------------------------------------------------------------------------

def test_shards_add_up_to_the_whole():
    items = [('liver liver spleen', 'liver kidney', 'open'), ('yes', 'yes', 'closed'),
             ('left lobe', 'the left lobe', 'open'), ('no', 'yes', 'closed'), ('two lesions', '2 lesions', 'number')]
    whole, a, b = M.VQAScores(), M.VQAScores(), M.VQAScores()
    for i, item in enumerate(items):
        whole.add_item(*item)
        (a if i % 2 else b).add_item(*item)
    # through JSON, as processes would exchange them
    b = M.VQAScores.from_state_dict(json.loads(b.to_json()))
    for combined in (a + b, sum([a, b])):
        assert isinstance(combined, M.VQAScores)
        got, want = combined.to_dict(), whole.to_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-12), k
    s1, s2 = M.SegScores(), M.SegScores()
    s1.add_iou(0.5, 'ct')
    s2.add_iou(1.0, 'pet')
    merged = (s1 + s2).to_dict()
    assert merged['mecovqa_g/modalities'] == 2 and merged['count'] == 2


# --- BLEU against nltk -----------------------------------------------------------------------------------------



def _nltk(refs, hyp, weights):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # nltk warns for every n-gram order without a match
        return float(nltk_bleu.sentence_bleu(refs, hyp, weights=weights))


def test_bleu_equals_nltk_on_fresh_random_sentences():
    seed = int.from_bytes(os.urandom(4), 'little')
    rng = np.random.default_rng(seed)
    vocab = ['liver', 'lesion', 'left', 'lobe', 'ct', 'shows', 'is', 'no', 'mass', '2']  # small: n-grams do match
    for _ in range(400):
        hyp = list(rng.choice(vocab, rng.integers(0, 13)))
        refs = [list(rng.choice(vocab, rng.integers(0, 13))) for _ in range(rng.integers(1, 3))]
        for weights in M.BLEU_WEIGHTS.values():
            want, got = _nltk(refs, hyp, weights), M.sentence_bleu(refs, hyp, weights)
            assert got == pytest.approx(want, rel=1e-12, abs=0), (seed, hyp, refs, weights)


def test_bleu_hand_cases_and_zero_when_a_higher_order_never_matches():
    hyp, ref = 'liver is large'.split(), 'large is liver'.split()
    # unigrams 3/3, no bigram matches ('liver is', 'is large' vs 'large is', 'is liver'), |hyp| = |ref| -> bp 1.
    assert M.sentence_bleu([ref], hyp, (1, 0, 0, 0)) == 1.0
    # nltk's no-smoothing result: the missing orders enter as float_info.min, so the 4-gram score is
    # exp(0.75 ln(2.2e-308)) ~ 1e-231 -- 0 at any printed precision, and equal to nltk's value.
    got = M.sentence_bleu([ref], hyp)
    assert got < 1e-200 and got == pytest.approx(_nltk([ref], hyp, (0.25,) * 4), rel=1e-12)
    assert M.sentence_bleu([ref], hyp, (0, 1, 0, 0)) <= sys.float_info.min * 1.0001
    # no unigram match or an empty hypothesis -> exactly 0.
    assert M.sentence_bleu([ref], ['spleen']) == 0.0 and M.sentence_bleu([ref], []) == 0.0
    # brevity: hyp 'liver is' (2) vs ref of 3, both unigrams match -> BLEU-1 = exp(1 - 3/2) = 0.6065.
    assert M.sentence_bleu([ref], ['liver', 'is'], (1, 0, 0, 0)) == pytest.approx(math.exp(-0.5), rel=1e-15)
