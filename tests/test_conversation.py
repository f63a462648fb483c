"""Tokenizer ids in the reference's order, its whitespace rule around added tokens, the llava_v1 / plain templates
and their labels, on the offline tiny tokenizer (the golden comparison with the reference is
test_tokenizer_golden.py)."""
import pickle

import numpy as np
import pytest

from medplib_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
from medplib_jax.data.conversation import (
    SYSTEM_LLAVA_V1,
    ConversationError,
    build_prompt,
    tokenize_conversation,
    with_image_prefix,
)
from medplib_jax.data.tokenizer import ADDED_TOKENS, TINY_BASE_VOCAB, TokenIds, tiny_tokenizer


@pytest.fixture(scope='module')
def tok():
    return tiny_tokenizer()


def test_added_token_ids_follow_the_reference_order(tok):
    assert len(ADDED_TOKENS) == 267
    ref = TokenIds.for_base_vocab(32000)
    assert (ref.seg, ref.region_start, ref.region_end, ref.im_start, ref.im_end, ref.vocab_size) == \
        (32000, 32003, 32004, 32265, 32266, 32267)
    ids = tok.ids
    assert ids == TokenIds.for_base_vocab(TINY_BASE_VOCAB) and len(tok) == ids.vocab_size == 576
    assert [tok.token_to_id(t) for t in ('<SEG>', '<region>', '</region>', '<im_start>', '<im_end>')] == \
        [ids.seg, ids.region_start, ids.region_end, ids.im_start, ids.im_end]
    assert [tok.token_to_id(t) for t in ('<unk>', '<s>', '</s>', '<0x0A>', '▁the')] == [0, 1, 2, 3 + 10, 259 + 30]
    assert ids.pad == 0 and ids.bos == 1 and ids.eos == 2


def test_tiny_tokenizer_is_a_llama_layout_sentencepiece_model(tok):
    # BOS, dummy prefix, the merges, byte fallback for what the 50 pieces lack (capitals, non-ASCII)
    ids = tok.encode('the liver')
    assert ids[0] == 1 and ids[1] == tok.token_to_id('▁the') and 'A'.encode()[0] + 3 in tok.encode('A')
    assert tok.encode('é', bos=False) == [tok.token_to_id('▁'), 0xC3 + 3, 0xA9 + 3]
    text = 'Is the  CT lesion round? Oui, bénigne 肝 🙂\n'
    assert tok.decode(tok.encode(text)) == '<s>' + text and tok.decode(tok.encode(text, bos=False)) == text
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)  # grain worker processes
    with pytest.raises(ValueError, match='id -200 is outside the vocab of 576'):
        tok.decode([5, IMAGE_TOKEN_INDEX])


def test_whitespace_around_added_tokens_is_stripped_not_around_eos(tok):
    enc = tok.encode
    seg, eos = tok.ids.seg, tok.ids.eos
    # transformers 4.31's slow LlamaTokenizer, as train_ds_medplib.py loads it: no '▁' or newline piece ever touches an
    # added token; each chunk gets its own dummy prefix
    assert enc('is <SEG> here') == enc('is<SEG>here') == enc('is') + [seg] + enc('here', bos=False)
    assert enc('<im_end>\n\t Please') == enc('<im_end>Please')
    assert enc('at \u00a0<region></region>\u3000?') == enc('at<region></region>?')
    # </s> (a special AddedToken without lstrip / rstrip) keeps its neighbours' whitespace
    assert enc('yes </s> no') == enc('yes ') + [eos] + enc(' no', bos=False) != enc('yes</s>no')
    assert enc('') == [1] and enc(' <SEG> ', bos=False) == [seg]


def test_prompt_text_matches_the_template():
    assert build_prompt([('q1', 'a1'), ('q2', 'a2')]) == \
        f'{SYSTEM_LLAVA_V1} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>'
    # get_prompt writes an empty message as 'ROLE:' with no separator
    assert build_prompt([('q1', '')]) == f'{SYSTEM_LLAVA_V1} USER: q1 ASSISTANT:'
    assert build_prompt([('<im_start><image><im_end>\nq', 'A CT.')], template='plain') == \
        '<im_start><image><im_end>A CT.\n'
    assert with_image_prefix('What is shown? <image>') == '<im_start><image><im_end>\nWhat is shown?'


def test_labels_are_exactly_the_assistant_tokens(tok):
    ids = tok.ids
    turns = [(with_image_prefix('<image>\nis the lesion at <region></region> round?'), 'yes, it is.'),
             ('and the liver?', 'here <SEG>')]
    out = tokenize_conversation(tok, turns, num_image_tokens=16, max_length=512)
    input_ids, labels = out.input_ids, out.labels
    assert out.label_mismatch is None and input_ids[0] == ids.bos and labels[0] == IGNORE_INDEX
    assert (input_ids == IMAGE_TOKEN_INDEX).sum() == 16 and out.num_regions == 1 and out.num_seg == 1
    first_image = int(np.argmax(input_ids == IMAGE_TOKEN_INDEX))
    assert input_ids[first_image - 1] == ids.im_start and input_ids[first_image + 16] == ids.im_end
    r = int(np.argmax(input_ids == REGION_TOKEN_INDEX))
    assert input_ids[r - 1] == ids.region_start and input_ids[r + 1] == ids.region_end
    supervised = input_ids[labels != IGNORE_INDEX]
    np.testing.assert_array_equal(labels[labels != IGNORE_INDEX], supervised)
    # exactly the two answers and their </s>, in order (the space before <SEG> stripped, as the reference does)
    assert tok.decode(supervised.tolist()) == 'yes, it is.</s>here<SEG></s>'
    assert (supervised == ids.eos).sum() == 2
    # nothing of the prompt: the text right before each answer ends with "ASSISTANT:"
    for i in np.nonzero(np.diff((labels != IGNORE_INDEX).astype(int)) == 1)[0]:
        assert tok.decode([int(t) for t in input_ids[i - 12:i + 1] if t >= 0]).endswith('ASSISTANT:')


def test_a_tokenization_mismatch_keeps_the_sample_with_every_label_ignored(tok):
    # the reference's rounds split on " ASSISTANT: ": a question holding it breaks the arithmetic
    turns = [(with_image_prefix('<image>\nsay ASSISTANT: hi'), 'hi')]
    out = tokenize_conversation(tok, turns, num_image_tokens=4, max_length=512)
    assert out.label_mismatch is not None and (out.labels == IGNORE_INDEX).all()
    assert out.input_ids[-1] == tok.ids.eos and (out.input_ids == IMAGE_TOKEN_INDEX).sum() == 4
    cur, total = out.label_mismatch
    assert total == len(out.input_ids) - 3 and cur == 1  # the round loop stops before the first round


def test_plain_template_supervises_the_caption_and_newline(tok):
    out = tokenize_conversation(tok, [(with_image_prefix('<image>\ndescribe'), 'a round lesion')],
                                num_image_tokens=8, max_length=128, template='plain')
    ids = tok.ids
    assert out.input_ids[:3].tolist() == [ids.bos, ids.im_start, IMAGE_TOKEN_INDEX]
    assert out.input_ids[10] == ids.im_end and (out.labels[:11] == IGNORE_INDEX).all()
    assert tok.decode(out.labels[11:].tolist()) == 'a round lesion\n'


def test_over_long_and_malformed_conversations_are_errors(tok):
    turns = [(with_image_prefix('what is this?'), 'a long answer ' * 20)]
    with pytest.raises(ConversationError, match=r'tokens \(with 576 image tokens\) exceed max_length=600'):
        tokenize_conversation(tok, turns, num_image_tokens=576, max_length=600, source='mecovqa.json[3]')
    with pytest.raises(ConversationError, match='expected exactly one <image>, found 0'):
        tokenize_conversation(tok, [('no image here', 'ok')], num_image_tokens=4, max_length=100)
