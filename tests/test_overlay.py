"""Prediction pictures: the contour of a mask, the overlay's layout, the routing picture's colours."""
import numpy as np
import pytest

from medplib_jax.infer.overlay import EXPERT_COLOURS, contour, overlay, routing_image


def test_contour_is_the_boundary_grown_by_one():
    mask = np.zeros((12, 12), bool)
    mask[3:9, 2:10] = True
    edge = contour(mask)
    inner = np.zeros_like(mask)
    inner[5:7, 4:8] = True  # two pixels in from every side: never on the contour
    assert edge[3, 2:10].all() and edge[8, 2:10].all() and edge[3:9, 2].all() and edge[3:9, 9].all()
    assert not (edge & inner).any() and edge[2, 5] and not edge[0, 0]  # grown one pixel outwards


def test_overlay_and_routing_pictures(np_rng):
    image = np_rng.integers(0, 256, size=(60, 90, 3), dtype=np.uint8)
    mask = np.zeros((60, 90), bool)
    mask[10:30, 20:50] = True
    pic = overlay(image, mask, mask, question='Where is the lesion?', answer='Here <SEG>.', width=180)
    assert pic.width == 180 and pic.height > 120  # the image scaled to 180 x 120, then the text
    px = np.asarray(pic)
    assert (px[20 * 2, 30 * 2] != image[20, 30]).any()  # tinted inside the mask
    routing = np.array([[0, 1, -1], [0, 1, 1]])
    pic = np.asarray(routing_image(['\u2581a', 'b', '</s>'], routing, width=300))
    for colour in (EXPERT_COLOURS[0], EXPERT_COLOURS[1]):
        assert (pic.reshape(-1, 3) == np.asarray(colour)).all(-1).sum() > 0, colour
    with pytest.raises(ValueError, match='3 tokens, routing for 2'):
        routing_image(['a', 'b', 'c'], routing[:, :2])


def test_routing_picture_of_a_newline_token():
    """A byte-fallback token can decode to a line break (an untrained model emits them): its box shows it escaped
    instead of PIL refusing to measure multiline text (which stopped `medplib-jax eval` writing its pictures)."""
    pic = routing_image(['\u2581a', '\n', '\t', 'b'], np.array([[0, 1, 1, 0]]), width=300)
    assert pic.width == 300 and pic.height > 40
