"""Static-shape merge of image tokens / region embeddings and the <SEG> position rule."""
import jax.numpy as jnp
import numpy as np

from medplib_jax.models.multimodal import (
    IMAGE_TOKEN_INDEX as IMG,
    REGION_TOKEN_INDEX as REG,
    embeddable_ids,
    merge_embeddings,
    seg_positions,
)


def test_merge_places_image_tokens_and_regions_in_order(np_rng):
    ids = np.array([[1, 7, IMG, IMG, IMG, 8, 5, 9, REG, 10, 0],
                    [1, 7, IMG, IMG, IMG, 8, 9, REG, 10, 9, REG]])
    d = 4
    tok = np_rng.normal(size=(2, 11, d)).astype(np.float32)
    img = np_rng.normal(size=(2, 3, d)).astype(np.float32)
    reg = np_rng.normal(size=(2, 2, d)).astype(np.float32)
    out = np.asarray(merge_embeddings(jnp.asarray(tok), jnp.asarray(ids), jnp.asarray(img), jnp.asarray(reg)))
    np.testing.assert_array_equal(out[0, 2:5], img[0])
    np.testing.assert_array_equal(out[1, 2:5], img[1])
    np.testing.assert_array_equal(out[0, 8], reg[0, 0])
    np.testing.assert_array_equal(out[1, 7], reg[1, 0])
    np.testing.assert_array_equal(out[1, 10], reg[1, 1])
    text = (ids >= 0)
    np.testing.assert_array_equal(out[text], tok[text])
    assert int(embeddable_ids(jnp.asarray(ids)).min()) == 0


def test_seg_positions_are_the_tokens_before_seg():
    SEG = 50
    ids = jnp.asarray([[1, 4, SEG, 2, 4, 4, SEG, 2], [1, 4, 4, 4, 4, 2, 0, 0], [1, SEG, SEG, SEG, 2, 0, 0, 0]])
    pos, valid = seg_positions(ids, SEG, max_seg=2)
    assert pos.tolist() == [[1, 5], [0, 0], [0, 1]]
    assert valid.tolist() == [[True, True], [False, False], [True, True]]
