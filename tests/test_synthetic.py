"""The synthetic MeCoVQA-like generator: reference formats, every kind present, deterministic, usable."""
import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest

from medplib_jax.constants import IGNORE_INDEX
from medplib_jax.data.conversation import tokenize_conversation
from medplib_jax.data.images import load_image, load_mask
from medplib_jax.data.records import read_records
from medplib_jax.data.regions import regions_to_grids
from medplib_jax.data.synthetic import (
    CLASS_IDS,
    FILES,
    LOOKS,
    MODALITIES,
    MODALITY_OPTIONS,
    TOKENIZER,
    demo_vocab_size,
    make_demo_data,
)
from medplib_jax.data.tokenizer import TINY_BASE_VOCAB, TokenIds, load_tokenizer, tiny_tokenizer


def test_generated_set_parses_with_zero_errors_and_is_usable(tmp_path):
    counts = make_demo_data(str(tmp_path), num_images=16, seed=3)
    # per image: complex, three region prompts, closed, and a grounding and a where-question per shape (1 to 3)
    grounding = sum(counts[FILES['grounding'].format(split=s)] for s in ('train', 'test'))
    assert 16 <= grounding <= 48 and sum(counts.values()) == 16 * 5 + 2 * grounding
    tok = load_tokenizer(str(tmp_path / TOKENIZER))  # the demo tokenizer written beside the data
    kinds, modalities = set(), set()
    for name in counts:
        records, skipped = read_records(str(tmp_path / name), str(tmp_path), strict=True)
        assert not skipped
        for rec in records:
            kinds.add(rec.kind)
            modalities.add(rec.modality)
            image = load_image(rec.image)
            assert image.dtype == np.uint8 and image.ndim == 3
            for m in rec.masks:
                assert load_mask(m, image.shape[:2]).any()
            if rec.regions:
                h, w = image.shape[:2]
                prompts = [r.prompt for r in rec.regions if r.prompt] or []
                grids, valid = regions_to_grids(prompts, h, w, max_regions=1) if prompts else (None, None)
                assert valid is None or valid.all()
            out = tokenize_conversation(tok, [(q.replace('<image>\n', '<im_start><image><im_end>\n'), a)
                                              for q, a in rec.turns], num_image_tokens=8, max_length=2048)
            assert out.num_seg == len(rec.masks) and out.num_regions == len(rec.regions)
            assert out.label_mismatch is None and (out.labels != IGNORE_INDEX).any()
    assert kinds == {'vqa', 'region', 'grounding'}
    closed = read_records(str(tmp_path / FILES['closed'].format(split='train')), str(tmp_path))[0]
    assert closed and all(sorted(r.options) == sorted(MODALITY_OPTIONS) and r.answer_type == 'closed'
                          for r in closed)
    for r in closed:  # the answer is the image's modality, named among the options in the question
        assert r.turns[0][1] == MODALITY_OPTIONS[list(MODALITIES).index(r.modality_type.replace('-', '_'))]
        assert f'Options: {", ".join(r.options)}' in r.turns[0][0]
    assert modalities == {'ct', 'mr', 'x', 'dermoscopy'}
    assert all(name.format(split='train') in counts for name in FILES.values())


def test_demo_tokenizer_spells_every_word_of_the_set_as_one_piece(tmp_path):
    """Every word in the records (and the conversation template around them) is one token of the demo tokenizer;
    other text still encodes byte by byte as with the tiny tokenizer, and the added tokens follow its base vocab."""
    import re

    from medplib_jax.data.conversation import SYSTEMS, build_prompt
    counts = make_demo_data(str(tmp_path), num_images=12, seed=5)
    tok, tiny = load_tokenizer(str(tmp_path / TOKENIZER)), tiny_tokenizer()
    assert tok.ids == TokenIds.for_base_vocab(demo_vocab_size() - 267) and len(tok) == demo_vocab_size()
    assert tok.ids.seg > TINY_BASE_VOCAB and tiny.ids.vocab_size == 576
    texts = [v['value'] for name in counts for rec in __import__('json').load(open(tmp_path / name))
             for v in rec['conversations']]
    texts.append(build_prompt([('Which imaging modality is this?', 'CT')], system=SYSTEMS['reference_eval']))
    words = 0
    for text in texts:
        for word in re.findall(r"[A-Za-z][A-Za-z'-]*", re.sub(r'<[^>]*>[^<]*</[^>]*>|<[^>]*>', ' ', text)):
            ids = tok.encode(word, bos=False)  # after a space: the dummy prefix gives it its `▁`
            assert len(ids) == 1 and tok.decode(ids) == word, (word, ids)
            ids = tok.encode('\n' + word, bos=False)  # at a line start: no `▁`
            assert len(ids) == 3 and tok.decode(ids[-1:]) == word, (word, ids)
            words += 1
        assert tok.decode(tok.encode(text, bos=False)) == tiny.decode(tiny.encode(text, bos=False))
    assert words > 500
    assert tok.encode('7 Zq', bos=False) == tiny.encode('7 Zq', bos=False)  # no word pieces: bytes, as before


def test_same_seed_same_files(tmp_path):
    make_demo_data(str(tmp_path / 'a'), num_images=6, seed=1)
    make_demo_data(str(tmp_path / 'b'), num_images=6, seed=1)
    cmp = filecmp.dircmp(tmp_path / 'a', tmp_path / 'b')
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    for sub in ('images', 'masks'):
        assert not filecmp.dircmp(tmp_path / 'a' / sub, tmp_path / 'b' / sub).diff_files


@pytest.mark.e2e
def test_cli_make_demo_data(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, '-m', 'medplib_jax', 'make-demo-data', str(tmp_path / 'd'),
                          '--num_images=4'], capture_output=True, text=True, cwd=root,
                         env=dict(os.environ, PYTHONPATH=root), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'MeCoVQA_Grounding_train.json' in res.stdout
    assert (tmp_path / 'd' / 'images').is_dir()


def test_each_class_has_its_own_look_and_shapes_do_not_overlap(tmp_path):
    """What a question names can be found by looking: the pixels under each mask have their class's intensity
    (tissue + LOOKS offset, up to the noise), and no two masks of an image share a pixel."""
    make_demo_data(str(tmp_path), num_images=12, seed=4)
    records, _ = read_records(str(tmp_path / FILES['grounding'].format(split='train')), str(tmp_path))
    assert records
    for rec in records:
        image = load_image(rec.image)[..., 0].astype(float)
        modality = next(m for m in MODALITIES if os.path.basename(rec.image).startswith(MODALITIES[m][0]))
        stem = os.path.splitext(os.path.basename(rec.image))[0]
        files = sorted(f for f in os.listdir(tmp_path / 'masks') if f.startswith(stem + '--'))
        union = np.zeros(image.shape, int)
        for f in files:
            mask = load_mask(str(tmp_path / 'masks' / f), image.shape) > 0
            union += mask
            cls = int(f.rsplit('--', 1)[1].split('_')[0])
            name = next(n for n in MODALITIES[modality][3] if CLASS_IDS[n] == cls)
            tissue = MODALITIES[modality][2]
            expected = tissue + LOOKS[modality, name][0]
            if modality != 'x_ray':  # its vertical gradient shifts every pixel by up to 20
                assert abs(np.median(image[mask]) - min(255, max(0, expected))) < 8, (f, name)
        assert union.max() == 1


def test_where_answers_name_the_organ_asked_and_the_quadrant_its_mask_lies_in(tmp_path):
    """Each shape's where-question (complex file) names the organ its grounding question asks for, and the answer's
    quadrant is where that organ's mask file lies: the mask's bounding-box centre against the image centre."""
    import json
    import re
    make_demo_data(str(tmp_path), num_images=12, seed=6)
    for split in ('train', 'test'):
        grounding = json.load(open(tmp_path / FILES['grounding'].format(split=split)))
        where = {r['id']: r for r in json.load(open(tmp_path / FILES['complex'].format(split=split)))
                 if r['id'].startswith('w')}
        assert len(where) == len(grounding)
        for g in grounding:
            i, k = re.fullmatch(r'g(\d+)(?:_(\d+))?', g['id']).groups()
            w = where.pop(f'w{i}_{k or 0}')
            organ = re.search(r'segment out the (\w+) in', g['conversations'][0]['value']).group(1)
            assert w['image'] == g['image'] and w['answer_type'] == 'open'
            assert w['conversations'][0]['value'] == f'<image>\nWhere is the {organ} in this image?'
            path = re.search(r'<mask>(.*)</mask>', g['conversations'][1]['value']).group(1)
            image = load_image(str(tmp_path / g['image']))
            ys, xs = np.nonzero(load_mask(str(tmp_path / path), image.shape[:2]))
            h, w_ = image.shape[:2]
            vertical = 'lower' if (ys.min() + ys.max()) / 2 >= h / 2 else 'upper'
            horizontal = 'right' if (xs.min() + xs.max()) / 2 >= w_ / 2 else 'left'
            assert w['conversations'][1]['value'] == f'{organ}, in the {vertical} {horizontal} part of the image.'
        assert not where
