"""The tokenizer and conversation tokenisation against the reference's golden ids and labels.

tests/fixtures/tokenizer/golden.json was written by make_golden.py with transformers 4.31's slow LlamaTokenizer and
an independent re-implementation of the reference's tokenizer_image_token / preprocess_v1 (see its docstring), on
the small LLaMA-layout SentencePiece model beside it. Comparison is exact: with num_image_tokens=1 the project's
layout is the reference's (one -200), and with 576 it is that with the -200 repeated.
"""
import json
import os
import shutil

import numpy as np
import pytest

from medplib_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from medplib_jax.data.conversation import tokenize_conversation, with_image_prefix
from medplib_jax.data.tokenizer import ADDED_TOKENS, TokenizerError, load_tokenizer, tiny_model_proto

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tokenizer')


@pytest.fixture(scope='module')
def golden():
    with open(os.path.join(FIXTURE, 'golden.json'), encoding='utf-8') as f:
        return json.load(f)


@pytest.fixture(scope='module')
def tok():
    return load_tokenizer(FIXTURE)


def _turns(conversation):
    turns = [(conversation[i]['value'], conversation[i + 1]['value']) for i in range(0, len(conversation), 2)]
    return [(with_image_prefix(turns[0][0]), turns[0][1]), *turns[1:]]


def test_ids_and_labels_equal_the_reference(golden, tok):
    cases = golden['conversations']
    assert len(cases) >= 20 and golden['generator']['transformers'] == '4.31.0'
    assert tok.ids.seg == golden['generator']['base_vocab'] and len(tok) == golden['generator']['vocab_size']
    assert sum(c['mismatch'] for c in cases) >= 1 and sum(not c['mismatch'] for c in cases) >= 15
    for case in cases:
        out = tokenize_conversation(tok, _turns(case['conversation']), num_image_tokens=1, max_length=4096,
                                    source=case['name'])
        assert out.input_ids.tolist() == case['input_ids'], case['name']
        assert out.labels.tolist() == case['labels'], case['name']
        assert (out.label_mismatch is not None) == case['mismatch'], case['name']
        if case['mismatch']:
            assert (out.labels == IGNORE_INDEX).all() and out.input_ids.size, case['name']
        # the state before each <SEG> feeds the T-projector
        seg = np.nonzero(out.input_ids == tok.ids.seg)[0]
        assert out.input_ids[seg - 1].tolist() == case['seg_predecessors'], case['name']
        # the project's static layout: the same with the image placeholder repeated, labels ignored there
        wide = tokenize_conversation(tok, _turns(case['conversation']), num_image_tokens=576, max_length=4096)
        ref = np.asarray(case['input_ids'])
        i = int(np.argmax(ref == IMAGE_TOKEN_INDEX))
        np.testing.assert_array_equal(wide.input_ids,
                                      np.concatenate([ref[:i], np.full(575, IMAGE_TOKEN_INDEX), ref[i:]]))
        np.testing.assert_array_equal(wide.labels[i:i + 576], IGNORE_INDEX)
        np.testing.assert_array_equal(np.delete(wide.labels, np.s_[i:i + 575]), case['labels'])
    by_name = {c['name']: c for c in cases}
    # "... ASSISTANT: <SEG></s>": the state before <SEG> is the ':' one (no '▁' between)
    assert tok.decode(by_name['grounding_seg_only']['seg_predecessors']) == ':'
    assert by_name['question_contains_assistant_sep']['mismatch']


def test_a_tokenizer_model_only_folder_loads(tmp_path, tok):
    shutil.copy(os.path.join(FIXTURE, 'tokenizer.model'), tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = 'Segment the liver <SEG>.'
    assert loaded.ids == tok.ids and loaded.encode(text) == tok.encode(text)
    # the released checkpoint's folder: added_tokens.json with the reference's ids is accepted
    base = tok.ids.seg
    (tmp_path / 'added_tokens.json').write_text(json.dumps({t: base + k for k, t in enumerate(ADDED_TOKENS)}))
    assert load_tokenizer(tmp_path).ids == tok.ids


def test_wrong_added_tokens_json_is_one_error(tmp_path):
    shutil.copy(os.path.join(FIXTURE, 'tokenizer.model'), tmp_path)
    base = 800
    added = {t: base + k for k, t in enumerate(ADDED_TOKENS)}
    added['<im_start>'], added['<im_end>'] = base + 266, base + 265  # swapped
    del added['<gen_7>']
    added['<image>'] = base + 267
    (tmp_path / 'added_tokens.json').write_text(json.dumps(added))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(str(tmp_path / 'added_tokens.json'))
    for part in ('<gen_7> missing (expected 815)', '<im_start> is 1066, expected 1065',
                 '<im_end> is 1065, expected 1066', '<image> (1067) is not a MedPLIB token'):
        assert part in msg
    (tmp_path / 'added_tokens.json').write_text('{"<SEG>": 800,')
    with pytest.raises(TokenizerError, match='added_tokens.json: cannot read it as JSON'):
        load_tokenizer(tmp_path)


def test_folders_that_are_not_llama_tokenizers_are_clear_errors(tmp_path):
    fast_only = tmp_path / 'fast'
    fast_only.mkdir()
    (fast_only / 'tokenizer.json').write_text('{}')
    with pytest.raises(TokenizerError, match=r'fast: no tokenizer.model \(a SentencePiece model\)'):
        load_tokenizer(fast_only)
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'tokenizer.model').write_bytes(b'not a model')
    with pytest.raises(TokenizerError, match='broken/tokenizer.model: not a SentencePiece model'):
        load_tokenizer(broken)
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    m = sp_pb2.ModelProto.FromString(tiny_model_proto())
    m.pieces[1].piece, m.pieces[2].piece = m.pieces[2].piece, m.pieces[1].piece  # </s> at 1, <s> at 2
    m.trainer_spec.bos_id, m.trainer_spec.eos_id = 2, 1
    swapped = tmp_path / 'swapped'
    swapped.mkdir()
    (swapped / 'tokenizer.model').write_bytes(m.SerializeToString())
    with pytest.raises(TokenizerError, match=r"not LLaMA's layout \(<unk> 0, <s> 1, </s> 2\)"):
        load_tokenizer(swapped)
