"""Prediction pictures: the contour of a mask, the overlay's layout, the routing picture's colours, layout and
token texts."""
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from medplib_jax.infer.overlay import EXPERT_COLOURS, contour, overlay, readable_token, routing_image, routing_layout


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
    assert pic.width <= 300 and pic.height > 40
    assert [readable_token(t) for t in ['\u2581a', '\n', '\t', '\ufffd', 'é', '', '\u2581']] == [
        ' a', '\\n', '\\t', '\\ufffd', '\\xe9', "''", "' '"]  # PIL's bundled font draws ASCII only


def test_routing_layout_shows_every_token_whole_and_nothing_overlaps():
    """The serve page's complaint: a two-token mask answer (`<SEG>`, `</s>`) was two coloured underlines in the
    corner of a 720 pixel wide picture. Now the picture is as wide as its content, every token's box holds its
    whole text, rows wrap, and the title, boxes and legend never overlap."""
    font = ImageFont.load_default(size=13)
    texts = ['<SEG>', '</s>']
    short = routing_layout(texts, 2, title='Expert per answer token')
    long = routing_layout(texts * 40, 2, title='Expert per answer token', width=500)
    assert short.size[0] < long.size[0] <= 500  # as wide as needed, up to `width`
    assert long.size[1] > short.size[1] + 3 * long.boxes[0][3]  # then wrapped into rows
    for layout, n in ((short, 2), (long, 80)):
        width, height = layout.size
        rects = [*layout.boxes, *layout.legend, layout.title]
        assert len(layout.boxes) == n and len(layout.legend) == 3
        for k, (x, y, w, h) in enumerate(rects):
            assert 0 <= x and x + w <= width and 0 <= y and y + h <= height, (k, rects[k], layout.size)
            for x2, y2, w2, h2 in rects[k + 1:]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, 'overlap'
        for (_, _, w, _), text in zip(layout.boxes, texts * (n // 2)):
            assert w >= font.getlength(text) + 6
        assert [y for _, y, _, _ in layout.boxes] == sorted(y for _, y, _, _ in layout.boxes)  # in reading order


def test_routing_picture_writes_special_tokens_out():
    """Each token's box shows its text exactly as drawn alone on the box's colour (`<SEG>` and `</s>` literally)."""
    experts = np.array([[0, 1], [0, 1]])
    pic = np.asarray(routing_image(['<SEG>', '</s>'], experts, title='t'))
    layout = routing_layout(['<SEG>', '</s>'], 2, title='t')
    font = ImageFont.load_default(size=13)
    for (x, y, w, _), text, expert in zip(layout.boxes, ['<SEG>', '</s>'], (0, 1)):
        alone = Image.new('RGB', (w, 18), EXPERT_COLOURS[expert])
        ImageDraw.Draw(alone).text((3, 2), text, fill=(0, 0, 0), font=font)
        np.testing.assert_array_equal(pic[y:y + 18, x:x + w], np.asarray(alone))
        assert (pic[y:y + 18, x:x + w] != EXPERT_COLOURS[expert]).any(-1).sum() > 20  # text: not an empty box
