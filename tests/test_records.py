"""MeCoVQA / LLaVA records: parsing of the three MeCoVQA kinds and clear errors (or counted skips) for bad ones."""
import json

import numpy as np
import pytest
from PIL import Image

from medplib_jax.data.records import RecordError, modality_of, parse_record, read_records

IMG = 'images/ct_00--AbdomenCT1K--Case_00220--x_0359.png'
MASK = 'masks/ct_00--AbdomenCT1K--Case_00220--x_0359--0001_000.png'


@pytest.fixture
def folder(tmp_path):
    (tmp_path / 'images').mkdir()
    (tmp_path / 'masks').mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / IMG)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / MASK)
    return tmp_path


def _conv(q, a):
    return [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]


GOOD = [
    {'id': 'c1', 'image': IMG, 'conversations': _conv('<image>\nWhat organ is shown?', 'The liver.'),
     'answer_type': 'open'},
    {'id': 'r1', 'image': IMG, 'conversations': _conv(f'<image>\nDescribe <region>{MASK}</region>.', 'A lesion.')},
    {'id': 'g1', 'image': IMG, 'conversations': _conv('<image>\nSegment the liver.', f'<SEG><mask>{MASK}</mask>')},
    {'id': 'b1', 'image': IMG, 'conversations': _conv('<image>\nWhat is at <region>box:1,1,5,6</region>?', 2)},
]


def test_the_three_mecovqa_kinds_parse(folder):
    recs = [parse_record(r, source='set.json', index=i, image_folder=str(folder)) for i, r in enumerate(GOOD)]
    assert [r.kind for r in recs] == ['vqa', 'region', 'grounding', 'region']
    assert recs[0].answer_type == 'open' and recs[0].modality == 'ct'
    assert recs[1].turns[0][0] == '<image>\nDescribe <region></region>.'
    assert recs[1].regions[0].path == str(folder / MASK)
    assert recs[2].turns[0][1] == '<SEG>' and recs[2].masks == (str(folder / MASK),)
    assert recs[3].regions[0].prompt.kind == 'box' and recs[3].regions[0].prompt.value == (1, 1, 5, 6)
    assert recs[3].turns[0][1] == '2'  # numbers are cast to text, as the reference does
    assert modality_of('x_ray--Chest_Image_Pneum--abc--2d_none.png') == 'x'
    assert modality_of('llavamed/images/123.jpg') is None


BAD = [
    ({'image': IMG}, 'field conversations: expected a list'),
    ({'conversations': _conv('<image>q', 'a')}, 'field image: missing'),
    ({'image': 'images/nope.png', 'conversations': _conv('<image>q', 'a')}, 'field image: file not found'),
    ({'image': IMG, 'conversations': _conv('<image>q', '<SEG><mask>masks/none.png</mask>')},
     r'field conversations \(<mask>\): file not found'),
    ({'image': IMG, 'conversations': _conv('<image>q', f'<mask>{MASK}</mask>')}, 'needs exactly one'),
    ({'image': IMG, 'conversations': _conv('q without image', 'a')}, r'conversations\[0\]: the first question has no'),
    ({'image': IMG, 'conversations': [{'from': 'gpt', 'value': 'a'}, {'from': 'human', 'value': '<image>'}]},
     r"conversations\[0\].from: 'gpt', expected 'human'"),
    ({'image': IMG, 'conversations': _conv('<image>q', {'text': 'a'})}, r'conversations\[1\].value: dict is not text'),
    ({'image': 'images/xyz_00--D--c--2d_none.png', 'conversations': _conv('<image>q', 'a')},
     "unknown modality 'xyz'"),
    ({'image': IMG, 'conversations': _conv('<image><region>box:1,2</region>', 'a')}, 'box region needs 4 numbers'),
    ({'image': IMG, 'conversations': _conv(f'<image><mask>{MASK}</mask>', 'a')}, '<mask> in a human turn'),
    ({'image': IMG, 'conversations': _conv('<image>q', 'a'), 'answer_type': 3}, 'field answer_type'),
]


@pytest.mark.parametrize('raw,message', BAD)
def test_bad_records_name_file_index_and_field(folder, raw, message):
    with pytest.raises(RecordError, match=r'set\.json\[7\]: .*' + message):
        parse_record(raw, source='set.json', index=7, image_folder=str(folder))


def test_files_strict_and_counted_skips(folder):
    records = GOOD + [b for b, _ in BAD] + [dict(GOOD[0])]  # the last one repeats id c1
    path = folder / 'set.json'
    path.write_text(json.dumps(records))
    with pytest.raises(RecordError, match=r'set\.json\[4\]'):
        read_records(str(path), str(folder))
    good, skipped = read_records(str(path), str(folder), strict=False)
    assert [r.id for r in good] == ['c1', 'r1', 'g1', 'b1']
    assert skipped == {'record': 9, 'image': 1, 'mask': 1, 'region': 1, 'duplicate_id': 1}
    # JSON lines too
    jsonl = folder / 'set.jsonl'
    jsonl.write_text('\n'.join(json.dumps(r) for r in GOOD))
    assert len(read_records(str(jsonl), str(folder))[0]) == 4
    # in JSON lines, a line that does not decode is one bad record (reason 'json'), named with its line
    lines = [json.dumps(r).encode() for r in GOOD]
    jsonl.write_bytes(b'\n'.join(lines[:2] + [b'{"id": "caf\xe9"}', b'', b'{"id": ', *lines[2:]]))
    good, skipped = read_records(str(jsonl), str(folder), strict=False)
    assert [r.id for r in good] == ['c1', 'r1', 'g1', 'b1'] and skipped == {'json': 2}
    with pytest.raises(RecordError, match=r'set\.jsonl\[2\] \(line 3\): not UTF-8') as err:
        read_records(str(jsonl), str(folder))
    assert err.value.reason == 'json'


def test_region_prompt_forms_and_optional_fields(folder):
    raw = {'id': 'p', 'image': IMG, 'modality_type': 'CT', 'conversations': _conv(
        '<image>\n<region>point:3,4</region> and <region>point:3,4,7.5</region>?', 'x')}
    rec = parse_record(raw, source='s.json', index=0, image_folder=str(folder))
    assert [r.prompt.value for r in rec.regions] == [(3, 4), (3, 4, 7.5)] and rec.modality_type == 'CT'
    assert rec.regions[1].prompt.to_mask(8, 8).sum() == 8 * 8  # half-size 7.5 -> 8: covers the 8x8 image
    for spec, message in (('point:3,4,-1', 'negative half-size'), ('point:1', 'needs 2 or 3 numbers'),
                          ('box:5,1,2,6', 'needs x0 <= x1 and y0 <= y1')):
        bad = dict(raw, conversations=_conv(f'<image><region>{spec}</region>', 'x'))
        with pytest.raises(RecordError, match=message) as err:
            parse_record(bad, source='s.json', index=0, image_folder=str(folder))
        assert err.value.reason == 'region'
    with pytest.raises(RecordError, match='field modality_type: int'):
        parse_record(dict(raw, modality_type=1), source='s.json', index=0, image_folder=str(folder))


def test_closed_set_options(folder):
    conv = _conv('<image>\nWhich organ? Options: liver, spleen', 'spleen')
    omni = {'question_id': 'q7', 'image': IMG, 'conversations': conv, 'option_A': 'liver', 'option_B': 'spleen',
            'modality_type': 'CT(Computed Tomography)'}
    rec = parse_record(omni, source='omni.json', index=0, image_folder=str(folder))
    assert rec.options == ('liver', 'spleen') and rec.id == 'q7' and rec.modality_type.startswith('CT')
    assert parse_record({**GOOD[0], 'options': ['The liver.', 'Bone.']}, source='s.json', index=0,
                        image_folder=str(folder)).options == ('The liver.', 'Bone.')
    with pytest.raises(RecordError, match=r"omni\.json\[0\] \(id q7\): field options: the answer 'spleen' is not one "
                                          r"of \['liver', 'kidney'\]"):
        parse_record({**omni, 'option_B': 'kidney'}, source='omni.json', index=0, image_folder=str(folder))
    with pytest.raises(RecordError, match='field options: expected a non-empty list of strings'):
        parse_record({**GOOD[0], 'options': 'liver'}, source='s.json', index=0, image_folder=str(folder))


def test_image_names_without_suffix_resolve_to_png(folder):
    from medplib_jax.data.images import find_image
    stem = str(folder / IMG)[:-len('.png')]
    assert find_image(stem) == str(folder / IMG)
    assert find_image(str(folder / 'images/none')) == str(folder / 'images/none')


def test_unreadable_files_are_one_line_errors(folder):
    (folder / 'latin1.json').write_bytes('[{"image": "caf\xe9"}]'.encode('latin-1'))
    with pytest.raises(RecordError, match=r'latin1\.json\[0\]: not UTF-8'):  # one bad record, not the file
        read_records(str(folder / 'latin1.json'), str(folder))
    assert read_records(str(folder / 'latin1.json'), str(folder), strict=False) == ([], {'json': 1})
    (folder / 'broken.json').write_text('[{"image": ')
    with pytest.raises(RecordError, match=r'broken\.json: invalid JSON at line 1'):
        read_records(str(folder / 'broken.json'), str(folder))
