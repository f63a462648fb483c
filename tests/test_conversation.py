"""Tokenizer ids in the reference's order; the llava_v1 template; labels exactly on the assistant's answers."""
import numpy as np
import pytest

from medplib_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX
from medplib_jax.data.conversation import (ConversationError, SYSTEM_LLAVA_V1, build_prompt, tokenize_conversation,
                                           with_image_prefix)
from medplib_jax.data.tokenizer import ADDED_TOKENS, TINY_BASE_VOCAB, TokenIds, add_medplib_tokens, tiny_tokenizer


def test_added_token_ids_follow_the_reference_order():
    assert len(ADDED_TOKENS) == 267
    ref = TokenIds.for_base_vocab(32000)
    assert (ref.seg, ref.region_start, ref.region_end, ref.im_start, ref.im_end, ref.vocab_size) == \
        (32000, 32003, 32004, 32265, 32266, 32267)
    tok, ids = tiny_tokenizer()
    assert ids == TokenIds.for_base_vocab(TINY_BASE_VOCAB) and len(tok) == ids.vocab_size == 576
    assert tok.convert_tokens_to_ids(['<SEG>', '<region>', '</region>', '<im_start>', '<im_end>']) == \
        [ids.seg, ids.region_start, ids.region_end, ids.im_start, ids.im_end]
    assert tok.pad_token_id == 0 and tok.padding_side == 'right'
    # a tokenizer that already has them (the released checkpoint's) is verified, not extended
    assert add_medplib_tokens(tok) == ids and len(tok) == 576


def test_partial_or_misordered_added_tokens_are_errors():
    tok, _ = tiny_tokenizer()
    from transformers import LlamaTokenizer
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, **{f'<0x{i:02X}>': 3 + i for i in range(256)}}
    partial = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    partial.add_tokens(['<SEG>'], special_tokens=True)
    with pytest.raises(ValueError, match='has 1 of the 267 MedPLIB tokens'):
        add_medplib_tokens(partial, source='ckpt/tokenizer')


def test_prompt_text_matches_the_template():
    text, spans = build_prompt([('q1', 'a1'), ('q2', 'a2')])
    assert text == f'{SYSTEM_LLAVA_V1} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>'
    assert [text[s:e] for s, e in spans] == ['a1</s>', 'a2</s>']
    assert with_image_prefix('What is shown? <image>') == '<im_start><image><im_end>\nWhat is shown?'


def test_labels_are_exactly_the_assistant_tokens():
    tok, ids = tiny_tokenizer()
    turns = [(with_image_prefix('<image>\nis the lesion at <region></region> round?'), 'yes, it is.'),
             ('and the liver?', 'here <SEG>')]
    out = tokenize_conversation(tok, ids, turns, num_image_tokens=16, max_length=512)
    input_ids, labels = out.input_ids, out.labels
    assert input_ids[0] == ids.bos and labels[0] == IGNORE_INDEX
    assert (input_ids == IMAGE_TOKEN_INDEX).sum() == 16 and out.num_regions == 1 and out.num_seg == 1
    first_image = int(np.argmax(input_ids == IMAGE_TOKEN_INDEX))
    assert input_ids[first_image - 1] == ids.im_start and input_ids[first_image + 16] == ids.im_end
    r = int(np.argmax(input_ids == REGION_TOKEN_INDEX))
    assert input_ids[r - 1] == ids.region_start and input_ids[r + 1] == ids.region_end
    supervised = input_ids[labels != IGNORE_INDEX]
    np.testing.assert_array_equal(labels[labels != IGNORE_INDEX], supervised)
    # exactly the two answers and their </s>, in order; the text decodes back to them
    assert tok.decode(supervised.tolist()) == 'yes, it is.</s>here <SEG></s>'
    assert (supervised == ids.eos).sum() == 2 and ids.seg in supervised
    # nothing of the prompt: the unsupervised text right before each answer is "... ASSISTANT:" (+ a bare space
    # piece with this tiny vocabulary, which has no '▁y' / '▁h' merges)
    ends = np.nonzero(np.diff((labels != IGNORE_INDEX).astype(int)) == 1)[0]
    for i in ends:
        before = [int(t) for t in input_ids[i - 12:i + 1] if t >= 0]
        assert tok.decode(before).rstrip().endswith('ASSISTANT:')


def test_over_long_and_malformed_conversations_are_errors():
    tok, ids = tiny_tokenizer()
    turns = [(with_image_prefix('what is this?'), 'a long answer ' * 20)]
    with pytest.raises(ConversationError, match=r'tokens \(with 576 image tokens\) exceed max_length=600'):
        tokenize_conversation(tok, ids, turns, num_image_tokens=576, max_length=600, source='mecovqa.json[3]')
    with pytest.raises(ConversationError, match='expected exactly one <image>, found 0'):
        tokenize_conversation(tok, ids, [('no image here', 'ok')], num_image_tokens=4, max_length=100)
