"""The grain pipeline: round trip of the synthetic set, a bad-input corpus (strict errors; counted skips that keep
every good record exactly once), determinism and Orbax resume with 0 and 2 workers, per-process shards, mixing,
length buckets, the ArrayRecord source and the tensorstore image cache."""
import dataclasses
import json
import os
import re
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from medplib_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
from medplib_jax.data.config import DataConfig, DatasetSpec, ModelShapes
from medplib_jax.data.image_cache import ImageCache
from medplib_jax.data.images import clip_preprocess, load_image, load_mask, sam_preprocess
from medplib_jax.data.pipeline import build_dataset, build_tokenizer
from medplib_jax.data.records import REASONS, RecordError
from medplib_jax.data.skips import TooManySkipsError, skip_counts
from medplib_jax.data.sources import image_paths, write_array_record
from medplib_jax.data.synthetic import FILES, make_demo_data
from medplib_jax.data.tokenizer import TINY_BASE_VOCAB

SHAPES = ModelShapes(num_image_tokens=576, max_regions=1, max_seg=1, seg_token_id=TINY_BASE_VOCAB, vocab_size=576)
BUCKETS = (640, 768, 1024)
KINDS = ('complex', 'region', 'grounding', 'closed')


def _cfg(datasets, **kw):
    kw.setdefault('tokenizer', 'tiny')
    kw.setdefault('batch_size', 4)
    kw.setdefault('length_buckets', BUCKETS)
    kw.setdefault('mask_canvas', 256)
    return DataConfig(datasets={k: v if isinstance(v, DatasetSpec) else DatasetSpec(v)
                                for k, v in datasets.items()}, **kw)


def _take(cfg, n, *, seed=0, train=True, shard=None, state=None):
    it = iter(build_dataset(cfg, SHAPES, seed=seed, train=train, shard=shard))
    try:
        if state is not None:
            it.set_state(state)
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def _all(cfg, **kw):
    """One evaluation pass (train=False) -> list of batches."""
    it = iter(build_dataset(cfg, SHAPES, seed=0, train=False, **kw))
    try:
        return list(it), it
    finally:
        it.close()


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _rows(batches):
    """(dataset, record) of every valid row, in order."""
    return [(int(b['dataset_index'][i]), int(b['record_index'][i])) for b in batches
            for i in np.nonzero(b['example_valid'])[0]]


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp('synth')
    counts = make_demo_data(str(root), num_images=8, seed=5)
    return root, {k: str(root / FILES[k].format(split='train')) for k in KINDS}, counts


def test_round_trip_of_the_synthetic_set(synth):
    """Every record of every kind comes out once, with the shapes and dtypes the model takes and the values
    the loaders give."""
    root, files, _ = synth
    cfg = _cfg(files)
    batches, it = _all(cfg)
    n_records = [len(json.load(open(files[k]))) for k in KINDS]
    assert sorted(_rows(batches)) == [(d, i) for d, n in enumerate(n_records) for i in range(n)]
    assert sum(it.skipped.values()) == 0 and it.records_seen == sum(n_records)
    b = batches[0]
    expected = dict(input_ids=((4, None), np.int32), labels=((4, None), np.int32), token_mask=((4, None), bool),
                    clip_pixels=((4, 336, 336, 3), np.float32), sam_pixels=((4, 256, 256, 3), np.float32),
                    sam_size=((4, 2), np.int32), image_size=((4, 2), np.int32),
                    region_grids=((4, 1, 24, 24), np.uint8), region_valid=((4, 1), bool),
                    seg_masks=((4, 1, 256, 256), np.uint8), seg_valid=((4, 1), bool), mask_size=((4, 2), np.int32),
                    example_valid=((4,), bool), skip_reason=((4,), np.int32), label_mismatch=((4,), bool),
                    dataset_index=((4,), np.int32), record_index=((4,), np.int32))
    assert set(b) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert b[key].dtype == dtype, key
        assert b[key].shape[0] == 4 and all(s is None or s == t for s, t in zip(shape, b[key].shape)), key
    assert b['input_ids'].shape[1] in BUCKETS
    tok = build_tokenizer(cfg, SHAPES)
    kinds_seen = set()
    for batch in batches:
        for i in np.nonzero(batch['example_valid'])[0]:
            d, r = int(batch['dataset_index'][i]), int(batch['record_index'][i])
            rec = json.load(open(files[KINDS[d]]))[r]
            image = load_image(str(root / rec['image']))
            np.testing.assert_array_equal(batch['clip_pixels'][i], clip_preprocess(image))
            sam, size = sam_preprocess(image)
            np.testing.assert_array_equal(batch['sam_pixels'][i], sam)
            assert tuple(batch['sam_size'][i]) == size and tuple(batch['image_size'][i]) == image.shape[:2]
            ids_i, labels_i = batch['input_ids'][i], batch['labels'][i]
            n = int(batch['token_mask'][i].sum())
            assert not batch['token_mask'][i, n:].any() and (labels_i[n:] == IGNORE_INDEX).all()
            assert (ids_i == IMAGE_TOKEN_INDEX).sum() == 576
            answer = rec['conversations'][1]['value']
            assert tok.decode(labels_i[labels_i != IGNORE_INDEX].tolist()) == \
                answer.split('<mask>')[0].strip() + '</s>'
            has_region, has_seg = (ids_i == REGION_TOKEN_INDEX).any(), batch['seg_valid'][i, 0]
            assert has_region == batch['region_valid'][i, 0] == (KINDS[d] == 'region')
            assert has_seg == (KINDS[d] == 'grounding')
            if has_seg:
                mask_path = str(root / answer.split('<mask>')[1].split('</mask>')[0])
                h, w = image.shape[:2]
                assert tuple(batch['mask_size'][i]) == (h, w)
                np.testing.assert_array_equal(batch['seg_masks'][i, 0, :h, :w], load_mask(mask_path))
                assert batch['seg_masks'][i, 0].sum() == load_mask(mask_path).sum()
            kinds_seen.add(KINDS[d])
    assert kinds_seen == set(KINDS)


def test_real_dicom_and_nifti_images_through_the_pipeline(tmp_path):
    from nibabel.testing import data_path
    from pydicom.data import get_testdata_file
    shutil.copy(get_testdata_file('CT_small.dcm', download=False), tmp_path / 'ct.dcm')
    shutil.copy(os.path.join(data_path, 'anatomical.nii'), tmp_path / 'brain.nii')
    conv = [{'from': 'human', 'value': '<image>\nWhat is shown?'}, {'from': 'gpt', 'value': 'A scan.'}]
    (tmp_path / 'set.json').write_text(json.dumps([{'id': 'a', 'image': 'ct.dcm', 'conversations': conv},
                                                   {'id': 'b', 'image': 'brain.nii', 'conversations': conv}]))
    (batch,), it = _all(_cfg({'s': str(tmp_path / 'set.json')}, batch_size=2, strict=True))
    assert batch['example_valid'].all() and batch['image_size'].tolist() == [[128, 128], [41, 33]]
    np.testing.assert_array_equal(batch['clip_pixels'][0], clip_preprocess(load_image(str(tmp_path / 'ct.dcm'))))


# ---------------------------------------------------------------------------------------------------------------
# A bad-input corpus: each kind with the reason it is counted under and the words of its strict error.

IMG = 'images/ct_00--Corpus--case_0--z_0001.png'
H, W = 48, 64


def _conv(q, a):
    return [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]


def _corpus(folder):
    """Writes images / masks and returns (good records, [(kind, record or raw bytes, reason, message regex)])."""
    for sub in ('images', 'masks'):
        (folder / sub).mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / IMG)
    full = (folder / IMG).read_bytes()
    (folder / 'images/ct_00--Corpus--case_1--z_0001.png').write_bytes(full[:len(full) // 2])  # truncated
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(folder / 'masks/organ.png')
    Image.fromarray(np.zeros((H, W), np.uint8)).save(folder / 'masks/empty.png')
    Image.fromarray(mask[:20]).save(folder / 'masks/small.png')
    good = [
        {'id': 'vqa', 'image': IMG, 'conversations': _conv('<image>\nWhat is shown?', 'A CT slice.')},
        {'id': 'ground', 'image': IMG, 'conversations': _conv('<image>\nSegment the liver.',
                                                              '<SEG><mask>masks/organ.png</mask>')},
        {'id': 'free', 'image': IMG, 'conversations': _conv('<image>\nWhat is <region>masks/organ.png</region>?',
                                                            'An organ.')},
        {'id': 'box', 'image': IMG, 'conversations': _conv('<image>\nAnd <region>box:5,5,40,30</region>?', 'Fat.')},
        {'id': 'point', 'image': IMG, 'conversations': _conv('<image>\nAt <region>point:30,20,8</region>?', 'Air.')},
    ]
    q = '<image>\nWhat is shown?'
    bad = [
        ('truncated png', {'id': 'b1', 'image': 'images/ct_00--Corpus--case_1--z_0001.png',
                           'conversations': _conv(q, 'x')}, 'image', r'field image: .*cannot decode image'),
        ('missing image', {'id': 'b2', 'image': 'images/ct_00--Corpus--nope--z_0001.png',
                           'conversations': _conv(q, 'x')}, 'image', r'field image: .*image file not found'),
        ('missing mask', {'id': 'b3', 'image': IMG, 'conversations': _conv(
            '<image>\nSegment it.', '<SEG><mask>masks/gone.png</mask>')}, 'mask',
         r'field <mask>: .*mask file not found'),
        ('mask of wrong size', {'id': 'b4', 'image': IMG, 'conversations': _conv(
            '<image>\nSegment it.', '<SEG><mask>masks/small.png</mask>')}, 'mask',
         r'field <mask>: .*small\.png: mask is 64x20, the image is 64x48'),
        ('empty grounding mask', {'id': 'b5', 'image': IMG, 'conversations': _conv(
            '<image>\nSegment it.', '<SEG><mask>masks/empty.png</mask>')}, 'mask', 'the mask is empty'),
        ('box outside image', {'id': 'b6', 'image': IMG, 'conversations': _conv(
            '<image>\n<region>box:10,10,70,20</region>?', 'x')}, 'region', r'outside the 64x48 image'),
        ('point off image', {'id': 'b7', 'image': IMG, 'conversations': _conv(
            '<image>\n<region>point:5,60</region>?', 'x')}, 'region', r'point \(5.0, 60.0\) is outside'),
        ('negative radius', {'id': 'b8', 'image': IMG, 'conversations': _conv(
            '<image>\n<region>point:5,6,-3</region>?', 'x')}, 'region', 'negative half-size'),
        ('inverted box', {'id': 'b9', 'image': IMG, 'conversations': _conv(
            '<image>\n<region>box:30,10,20,20</region>?', 'x')}, 'region', r'needs x0 <= x1 and y0 <= y1'),
        ('empty free-form mask', {'id': 'b10', 'image': IMG, 'conversations': _conv(
            '<image>\n<region>masks/empty.png</region>?', 'x')}, 'region', 'the free-form region is empty'),
        ('missing <image>', {'id': 'b11', 'image': IMG, 'conversations': _conv('What is shown?', 'x')}, 'record',
         r'field conversations\[0\]: the first question has no <image>'),
        ('over-long conversation', {'id': 'b12', 'image': IMG, 'conversations': _conv(q, 'word ' * 400)},
         'too_long', r'field conversations: \d+ tokens \(with 576 image tokens\) exceed max_length=1024'),
        ('unknown field type', {'id': 'b13', 'image': IMG, 'conversations': _conv(q, {'text': 'x'})}, 'record',
         r'field conversations\[1\]\.value: dict is not text'),
        ('non-UTF-8 JSON', b'{"id": "b14", "image": "caf\xe9.png"}', 'json', r'\(line \d+\): not UTF-8'),
        ('duplicate id', {'id': 'vqa', 'image': IMG, 'conversations': _conv(q, 'again')}, 'duplicate_id',
         r"field id: duplicate id 'vqa' \(first at record 0\)"),
        ('two regions, max 1', {'id': 'b16', 'image': IMG, 'conversations': _conv(
            '<image>\n<region>point:5,6</region> or <region>point:9,9</region>?', 'x')}, 'too_many_regions',
         'config.model.medplib.max_regions=1'),
        ('<SEG> without a mask', {'id': 'b17', 'image': IMG, 'conversations': _conv(q, '<SEG>')}, 'record',
         '1 <SEG> tokens for 0 <mask> references'),
    ]
    return good, bad


def _write_jsonl(path, records):
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    path.write_bytes(b'\n'.join(lines) + b'\n')


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp('corpus')
    return folder, *_corpus(folder)


def test_corpus_has_every_required_kind(corpus):
    _, _, bad = corpus
    kinds = {k for k, *_ in bad}
    required = {'truncated png', 'missing image', 'missing mask', 'mask of wrong size', 'box outside image',
                'negative radius', 'point off image', 'empty free-form mask', 'missing <image>',
                'over-long conversation', 'unknown field type', 'non-UTF-8 JSON', 'duplicate id'}
    assert required <= kinds and len(kinds) >= 12


BAD_KINDS = ('truncated png', 'missing image', 'missing mask', 'mask of wrong size', 'empty grounding mask',
             'box outside image', 'point off image', 'negative radius', 'inverted box', 'empty free-form mask',
             'missing <image>', 'over-long conversation', 'unknown field type', 'non-UTF-8 JSON', 'duplicate id',
             'two regions, max 1', '<SEG> without a mask')


@pytest.mark.parametrize('kind,workers', [(k, 0) for k in range(len(BAD_KINDS))] + [(0, 2)],
                         ids=[*BAD_KINDS, 'truncated png, 2 workers'])
@pytest.mark.slow
def test_each_bad_kind_is_a_clear_error_when_strict(corpus, kind, workers):
    folder, good, bad = corpus
    name, record, reason, message = bad[kind]
    assert name == BAD_KINDS[kind]
    path = folder / f'strict_{kind}.jsonl'
    _write_jsonl(path, good[:1] + [record])
    cfg = _cfg({'s': str(path)}, strict=True, batch_size=2, worker_count=workers)
    with pytest.raises(RecordError) as err:
        _all(cfg)
    assert err.value.reason == reason
    # one line naming file, record and field (grain may append a note about its traceback below it)
    assert re.search(rf'strict_{kind}\.jsonl\[1\].*{message}', str(err.value).splitlines()[0]), str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
def test_bad_records_are_skipped_counted_and_every_good_one_yielded_once(corpus, caplog, workers):
    folder, good, bad = corpus
    # Good records spread over two files between the bad ones, so skips land in every batch position.
    records_a = [x for pair in zip(good, [b[1] for b in bad[:5]]) for x in pair] + [b[1] for b in bad[5:10]]
    records_b = good + [b[1] for b in bad[10:]]
    _write_jsonl(folder / 'a.jsonl', records_a)
    _write_jsonl(folder / 'b.jsonl', records_b)
    cfg = _cfg({'a': str(folder / 'a.jsonl'), 'b': str(folder / 'b.jsonl')}, batch_size=4, worker_count=workers)
    with caplog.at_level('WARNING'):
        batches, it = _all(cfg)
    rows = _rows(batches)
    expected_good = [(0, i) for i, r in enumerate(records_a) if r in good] + \
                    [(1, i) for i, r in enumerate(records_b) if r in good]
    assert sorted(rows) == sorted(expected_good) and len(rows) == len(set(rows)) == 2 * len(good)
    want = {r: 0 for r in REASONS}
    for _, _, reason, _ in bad:
        want[reason] += 1
    assert it.skipped == want
    total = {r: sum(skip_counts(b['skip_reason'])[r] for b in batches) for r in REASONS}
    assert total == want  # what a global sum over the batches gives
    assert it.records_seen == len(records_a) + len(records_b)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith('skipped (')]
    assert len(logged) == len(bad)
    assert any('skipped (image): ' in m and 'case_1' in m for m in logged)


def test_too_many_bad_records_stop_the_run_with_one_clear_error(corpus):
    folder, good, bad = corpus
    _write_jsonl(folder / 'mostly_bad.jsonl', good[:1] + [b[1] for b in bad[:8]])
    cfg = _cfg({'s': str(folder / 'mostly_bad.jsonl')}, max_skip_fraction=0.5, skip_check_after=4)
    with pytest.raises(TooManySkipsError, match=r'data: \d+ of \d+ records skipped, more than config\.data\.'
                                                r'max_skip_fraction=0\.5 \(most: \w+, \d+\); first: .*mostly_bad'):
        _all(cfg)


def test_whole_file_problems_fail_at_start(tmp_path):
    (tmp_path / 'broken.json').write_text('[{"image": "a.png"}, {"image": ')
    with pytest.raises(RecordError, match=r'broken\.json: invalid JSON at line 1 column 32'):
        _all(_cfg({'s': str(tmp_path / 'broken.json')}))
    with pytest.raises(RecordError, match=r'nothere\.json: records file not found'):
        _all(_cfg({'s': str(tmp_path / 'nothere.json')}))
    (tmp_path / 'empty.jsonl').write_text('\n')
    with pytest.raises(ValueError, match=r'config\.data\.datasets\.s: .*empty\.jsonl holds no records'):
        _all(_cfg({'s': str(tmp_path / 'empty.jsonl')}))


def test_bytes_that_are_not_utf8_inside_a_json_list_are_one_bad_record(corpus):
    """The released MeCoVQA files are JSON lists: one record with a bad byte (or an escaped lone surrogate) must
    not take the whole file down."""
    folder, good, _ = corpus
    body = b',\n'.join([json.dumps(good[0]).encode(), b'{"id": "bad", "image": "caf\xe9.png"}',
                        json.dumps(good[1]).encode(), b'{"id": "lone", "image": "' + IMG.encode() +
                        b'", "conversations": [{"from": "human", "value": "<image>\\ud800"}, '
                        b'{"from": "gpt", "value": "x"}]}', json.dumps(good[3]).encode()])
    (folder / 'list.json').write_bytes(b'[' + body + b']')
    batches, it = _all(_cfg({'s': str(folder / 'list.json')}))
    assert sorted(r for _, r in _rows(batches)) == [0, 2, 4]
    assert it.skipped['json'] == 2 and sum(it.skipped.values()) == 2
    assert it.first_messages['json'].startswith(f'{folder}/list.json[1]: not UTF-8')
    assert it.metrics()['data/skipped/json'] == 2 and it.metrics()['data/records_seen'] == 5


def test_resume_keeps_skip_totals_over_the_bad_corpus(corpus):
    """Saving mid-stream and restoring continues the skip totals and gives the uninterrupted batches, and the
    skip limit still reports the first message after a restore that lost it."""
    folder, good, bad = corpus
    _write_jsonl(folder / 'resume.jsonl', [x for pair in zip(good * 3, [b[1] for b in bad]) for x in pair])
    cfg = _cfg({'s': str(folder / 'resume.jsonl')}, batch_size=4)
    reference = iter(build_dataset(cfg, SHAPES, seed=7))
    expected = [next(reference) for _ in range(8)]
    it = iter(build_dataset(cfg, SHAPES, seed=7))
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))  # what Orbax writes
    restored = iter(build_dataset(cfg, SHAPES, seed=7))
    restored.set_state(state)
    rest = [next(restored) for _ in range(5)]
    for x, y in zip(rest, expected[3:]):
        _assert_same(x, y)
    assert restored.skipped == reference.skipped and restored.records_seen == reference.records_seen == 32
    assert sum(reference.skipped.values()) > 0
    strict_limit = iter(build_dataset(dataclasses.replace(cfg, max_skip_fraction=0.1, skip_check_after=1),
                                      SHAPES, seed=7))
    strict_limit.set_state(state)  # totals already over the limit; this process saw no message yet
    with pytest.raises(TooManySkipsError, match=r'first: '):
        next(strict_limit)
    for x in (it, reference, restored, strict_limit):
        x.close()


# ---------------------------------------------------------------------------------------------------------------
# Determinism, resume, shards, mixing.

def test_same_seed_same_batches_and_another_seed_another_order(synth):
    _, files, _ = synth
    cfg = _cfg({k: files[k] for k in ('complex', 'region', 'grounding')})
    a, b = _take(cfg, 4, seed=1), _take(cfg, 4, seed=1)
    for x, y in zip(a, b):
        _assert_same(x, y)
    c = _take(cfg, 4, seed=2)
    assert _rows(a) != _rows(c)


@pytest.mark.slow
@pytest.mark.parametrize('workers', [0, 2])
def test_resume_through_orbax_gives_the_uninterrupted_batches(synth, tmp_path, workers):
    """Batches N+1... after restoring the state saved at batch N equal an uninterrupted run's; with workers they
    also equal the single-process batches. Two epochs of a small mix, so the restore crosses an epoch."""
    _, files, _ = synth
    cfg = _cfg({'region': files['region'], 'grounding': DatasetSpec(files['grounding'], 2.0)},
               worker_count=workers)
    reference = _take(_cfg({'region': files['region'], 'grounding': DatasetSpec(files['grounding'], 2.0)}), 16,
                      seed=3)
    n = 7
    it = iter(build_dataset(cfg, SHAPES, seed=3))
    first = [next(it) for _ in range(n)]
    mngr = ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',))
    mngr.save(n, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    seen, skipped = it.records_seen, dict(it.skipped)
    it.close()
    restored = iter(build_dataset(cfg, SHAPES, seed=3))
    mngr.restore(n, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    rest = [next(restored) for _ in range(len(reference) - n)]
    assert restored.records_seen == seen + 4 * len(rest) and restored.skipped == skipped
    restored.close()
    mngr.close()
    for x, y in zip(first + rest, reference):
        _assert_same(x, y)
    n_region, n_ground = (len(json.load(open(files[k]))) for k in ('region', 'grounding'))
    grounding_rows = [r for d, r in _rows(reference) if d == 1]
    assert len(grounding_rows) > 2 * n_ground  # grounding is reshuffled twice (its own epochs) ...
    assert 4 * n > min(3 * n_region, 1.5 * n_ground)  # ... and the save lies past the mix's first epoch


@pytest.mark.parametrize('train', [False, True])
def test_two_processes_shards_are_disjoint_and_cover(synth, tmp_path, train):
    """An odd number of records: the shards end in padding rows, both run the same number of steps."""
    _, files, _ = synth
    odd = tmp_path / 'odd.jsonl'
    _write_jsonl(odd, json.load(open(files['complex']))[:5] + json.load(open(files['region']))[:4])
    cfg = _cfg({'odd': DatasetSpec(str(odd), image_folder=os.path.dirname(files['complex']))}, batch_size=4,
               num_epochs=1)
    shards = []
    for index in range(2):
        batches = _drain(cfg, grain.sharding.ShardOptions(shard_index=index, shard_count=2), train)
        assert all(b['input_ids'].shape[0] == 2 for b in batches)  # the global batch of 4 split over 2 processes
        shards.append(batches)
    assert len(shards[0]) == len(shards[1]) == 3  # ceil(ceil(9 / 2) / 2): every process runs the same steps
    a, b = set(_rows(shards[0])), set(_rows(shards[1]))
    assert not a & b and a | b == {(0, i) for i in range(9)}  # one epoch, shuffled or not
    padding = sum(int((batch['dataset_index'] == -1).sum()) for batches in shards for batch in batches)
    assert padding == 2 * 3 * 2 - 9
    # Process p holds the p-th block of every global batch: together they are exactly one process's batches (the
    # same rows in the same places: loss groups and per-row randomness do not depend on the process count).
    single = _drain(cfg, grain.sharding.ShardOptions(shard_index=0, shard_count=1), train)
    assert len(single) == 3
    for k, whole in enumerate(single):
        for key in ('dataset_index', 'record_index'):
            assert np.array_equal(np.concatenate([shards[0][k][key], shards[1][k][key]]), whole[key]), (k, key)


def _drain(cfg, shard, train):
    it = iter(build_dataset(cfg, SHAPES, seed=0, train=train, shard=shard))
    try:
        return list(it)
    finally:
        it.close()


def test_mixing_follows_the_weights(synth):
    _, files, _ = synth
    cfg = _cfg({'region': DatasetSpec(files['region'], 3.0), 'complex': DatasetSpec(files['complex'], 1.0)},
               batch_size=4)
    rows = _rows(_take(cfg, 5))
    assert [d for d, _ in rows].count(0) == 15 and len(rows) == 20
    # within each dataset, a permutation without repeats until its data runs out
    assert len({r for d, r in rows if d == 0}) == 15


def test_length_buckets_and_static_shapes(synth):
    _, files, _ = synth
    cfg = _cfg({'c': files['complex'], 'g': files['grounding']}, length_buckets=(600, 700, 800, 1024))
    for b in _take(cfg, 6):
        longest = int(b['token_mask'].sum(1).max())
        t = b['input_ids'].shape[1]
        assert t == min(x for x in (600, 700, 800, 1024) if x >= longest)
        assert b['region_grids'].shape[1:] == (1, 24, 24) and b['seg_masks'].shape[1:] == (1, 256, 256)


def test_array_record_source_gives_the_json_batches(synth, tmp_path):
    _, files, _ = synth
    ar = {k: str(tmp_path / f'{k}.array_record') for k in ('region', 'grounding')}
    for k, path in ar.items():
        assert write_array_record(files[k], path) == len(json.load(open(files[k])))
    root = os.path.dirname(files['region'])
    from_json = _take(_cfg({k: files[k] for k in ar}), 4)
    from_ar = _take(_cfg({k: DatasetSpec(p, image_folder=root) for k, p in ar.items()}), 4)
    for x, y in zip(from_json, from_ar):
        _assert_same(x, y)


class _CountingJson:
    """Stands in for the json module in data/records.py: counts the parses."""
    JSONDecodeError, dumps = json.JSONDecodeError, staticmethod(json.dumps)

    def __init__(self):
        self.calls = 0

    def loads(self, data):
        self.calls += 1
        return json.loads(data)


def test_start_up_parses_each_record_once(synth, tmp_path, monkeypatch):
    """Duplicate ids and the records an evaluator reads now come from one parse: n for n JSON lines, one for a
    JSON list (the file); the pipeline's start-up parses no more."""
    import medplib_jax.data.records as records
    from medplib_jax.data.sources import open_sources
    root, files, _ = synth
    raws = json.load(open(files['grounding']))
    _write_jsonl(tmp_path / 'g.jsonl', raws)
    for path, parses in ((str(tmp_path / 'g.jsonl'), len(raws)), (files['grounding'], 1)):
        cfg = _cfg({'g': DatasetSpec(path, image_folder=str(root))})
        counter = _CountingJson()
        with monkeypatch.context() as m:
            m.setattr(records, 'json', counter)
            (src,) = open_sources(cfg, keep_decoded=True)
            read = [src.record(i) for i in range(len(src))]
            assert counter.calls == parses, path
            build_dataset(cfg, SHAPES, seed=0)
            assert counter.calls == 2 * parses, path
        assert read == records.read_records(path, str(root))[0]


def test_image_cache_gives_the_uncached_batches(synth, corpus, tmp_path, monkeypatch):
    root, files, _ = synth
    folder, good, bad = corpus
    cfg = _cfg({'g': files['grounding'], 'r': files['region']})
    cache_dir = str(tmp_path / 'cache')
    failed = ImageCache.build(cache_dir, image_paths(cfg), progress=False)
    images = {r['image'] for k in ('grounding', 'region') for r in json.load(open(files[k]))}
    assert failed == {} and len(ImageCache(cache_dir)) == len(images) > 1
    uncached = _take(cfg, 4)
    import medplib_jax.data.preprocess as preprocess

    def no_decoding(path, **kw):
        raise AssertionError(f'decoded {path} although it is cached')
    with monkeypatch.context() as m:  # every image comes from the cache: nothing is decoded
        m.setattr(preprocess, 'load_image', no_decoding)
        cached = _take(dataclasses.replace(cfg, image_cache=cache_dir), 4)
    for x, y in zip(cached, uncached):
        _assert_same(x, y)
    # an image replaced after caching is read from its file again, not served stale
    first = json.load(open(files['grounding']))[0]['image']
    original = (root / first).read_bytes()
    changed = np.asarray(Image.open(root / first)).copy()
    changed[:10] = 255
    Image.fromarray(changed).save(root / 'changed.png')
    os.replace(root / 'changed.png', root / first)
    try:
        g_only = _cfg({'g': files['grounding']}, shuffle=False)
        fresh = _take(dataclasses.replace(g_only, image_cache=cache_dir), 1, train=True)[0]
        np.testing.assert_array_equal(fresh['clip_pixels'][0], clip_preprocess(changed))
    finally:
        (root / first).write_bytes(original)  # the module's other tests read it
    # unreadable images are left out of the cache and still skipped as 'image'
    _write_jsonl(folder / 'cache_set.jsonl', good[:2] + [bad[0][1]])
    cfg_bad = _cfg({'s': str(folder / 'cache_set.jsonl')})
    failed = ImageCache.build(str(tmp_path / 'cache2'), image_paths(cfg_bad), progress=False)
    assert len(failed) == 1 and 'cannot decode image' in next(iter(failed.values()))
    batches, it = _all(dataclasses.replace(cfg_bad, image_cache=str(tmp_path / 'cache2')))
    assert len(_rows(batches)) == 2 and it.skipped['image'] == 1
    index = tmp_path / 'cache2' / 'index.json'
    meta = json.loads(index.read_text())
    meta['format']['clip'] = [224, 224, 3]
    index.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='cache format .* differs from this version'):
        ImageCache(str(tmp_path / 'cache2'))
    with pytest.raises(FileNotFoundError, match='not an image cache'):
        ImageCache(str(tmp_path / 'nothing'))


def test_masks_of_images_larger_than_the_canvas_are_scaled_to_fit(tmp_path):
    (tmp_path / 'images').mkdir()
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / 'images/big.png')
    mask = np.zeros((300, 200), np.uint8)
    mask[50:250, 20:90] = 255
    Image.fromarray(mask).save(tmp_path / 'm.png')
    rec = {'image': 'images/big.png', 'conversations': _conv('<image>\nSegment it.', '<SEG><mask>m.png</mask>')}
    (tmp_path / 's.json').write_text(json.dumps([rec]))
    (batch,), _ = _all(_cfg({'s': str(tmp_path / 's.json')}, batch_size=1, mask_canvas=120, strict=True))
    assert tuple(batch['image_size'][0]) == (300, 200) and tuple(batch['mask_size'][0]) == (120, 80)
    rows, cols = (np.arange(120) * 300 / 120).astype(int), (np.arange(80) * 200 / 80).astype(int)
    np.testing.assert_array_equal(batch['seg_masks'][0, 0, :120, :80], (mask[rows][:, cols] > 0))
    assert batch['seg_masks'][0, 0, 120:].sum() == 0 and batch['seg_masks'][0, 0, :, 80:].sum() == 0


def test_multi_turn_conversation_supervises_every_answer(synth, tmp_path):
    root, files, _ = synth
    rec = json.load(open(files['grounding']))[0]
    rec['conversations'] = [rec['conversations'][0], {'from': 'gpt', 'value': 'It is there.'},
                            {'from': 'human', 'value': 'Now segment it.'}, rec['conversations'][1]]
    (tmp_path / 'multi.json').write_text(json.dumps([rec]))
    cfg = _cfg({'m': DatasetSpec(str(tmp_path / 'multi.json'), image_folder=str(root))}, batch_size=1, strict=True)
    (batch,), _ = _all(cfg)
    tok = build_tokenizer(cfg, SHAPES)
    labels = batch['labels'][0]
    assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == 'It is there.</s><SEG></s>'
    assert batch['seg_valid'][0, 0] and batch['seg_masks'][0, 0].any()


def test_tokenization_mismatch_is_kept_with_labels_ignored(synth, tmp_path):
    """As the reference: a question holding " ASSISTANT: " breaks its round arithmetic; the row trains nothing but
    is not a skip (strict makes it the error)."""
    root, files, _ = synth
    rec = json.load(open(files['complex']))[0]
    rec['conversations'][0]['value'] += ' Reply after ASSISTANT: here.'
    (tmp_path / 'mismatch.json').write_text(json.dumps([rec]))
    cfg = _cfg({'m': DatasetSpec(str(tmp_path / 'mismatch.json'), image_folder=str(root))}, batch_size=1)
    (batch,), it = _all(cfg)
    assert batch['example_valid'][0] and sum(it.skipped.values()) == 0
    assert batch['token_mask'][0].sum() > 576 and (batch['labels'][0] == IGNORE_INDEX).all()
    assert batch['label_mismatch'].tolist() == [True] and it.metrics()['data/label_mismatch'] == 1
    with pytest.raises(RecordError, match=r'mismatch\.json\[0\].*tokenization mismatch \(rounds 1 vs \d+ tokens\)'):
        _all(dataclasses.replace(cfg, strict=True))


def test_config_errors_name_the_key(synth):
    from configs.common import get_config
    _, files, _ = synth
    config = get_config()
    DataConfig.from_config(config.data)  # the shipped defaults are valid
    assert ModelShapes.from_config(config.model) == SHAPES
    bad = dict(config.data, batchsize=3)
    with pytest.raises(ValueError, match=r"config\.data: unknown keys \['batchsize'\]"):
        DataConfig.from_config(bad)
    bad = dict(config.data, datasets={'x': {'path': 'a.json', 'wieght': 2}})
    with pytest.raises(ValueError, match=r"config\.data\.datasets\.x: unknown keys \['wieght'\]"):
        DataConfig.from_config(bad)
    with pytest.raises(ValueError, match='length_buckets=.*increasing'):
        _cfg({'c': files['complex']}, length_buckets=(800, 600))
    with pytest.raises(ValueError, match=r'datasets\.c\.weight=0\.0: must be positive'):
        _cfg({'c': DatasetSpec(files['complex'], 0.0)})
    with pytest.raises(ValueError, match='vocab 576; the model has seg_token_id 309 and vocab_size 32267'):
        build_dataset(_cfg({'c': files['complex']}), ModelShapes(576, 1, 1, 309, 32267), seed=0)
    with pytest.raises(ValueError, match='batch_size=3 is not divisible by the 2 data processes'):
        build_dataset(_cfg({'c': files['complex']}, batch_size=3), SHAPES, seed=0,
                      shard=grain.sharding.ShardOptions(0, 2))
