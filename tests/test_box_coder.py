"""BoxCoder: hand-computed deltas, inverse, round trip, weights, clamping, broadcasting, dtype."""

from __future__ import annotations

import math

import pytest
import torch

from heads.box_coder import BoxCoder

ANCHOR = torch.tensor([0.0, 0.0, 10.0, 20.0])  # centre (5, 10), 10 x 20
BOX = torch.tensor([2.0, 4.0, 22.0, 14.0])  # centre (12, 9), 20 x 10


def test_encode_by_hand():
    d = BoxCoder(eps=0.0).encode(BOX, ANCHOR)
    # dx = (12 - 5) / 10, dy = (9 - 10) / 20, dw = log(20 / 10), dh = log(10 / 20)
    torch.testing.assert_close(d, torch.tensor([0.7, -0.05, math.log(2.0), math.log(0.5)]))
    # The default eps (1e-8) is invisible at these sizes.
    torch.testing.assert_close(BoxCoder().encode(BOX, ANCHOR), d)


def test_decode_by_hand():
    # Centre (5 + 0.5 * 10, 10 - 0.25 * 20) = (10, 5); size (10 * e**log 3, 20 * e**log 0.5) = (30, 10).
    deltas = torch.tensor([0.5, -0.25, math.log(3.0), math.log(0.5)])
    torch.testing.assert_close(BoxCoder().decode(deltas, ANCHOR), torch.tensor([-5.0, 0.0, 25.0, 10.0]))
    # Zero deltas give the anchor back.
    assert torch.equal(BoxCoder().decode(torch.zeros(4), ANCHOR), ANCHOR)


def test_weights_scale_deltas_and_invert():
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights=weights, eps=0.0)
    d = coder.encode(BOX, ANCHOR)
    torch.testing.assert_close(d, torch.tensor([7.0, -0.5, 5 * math.log(2.0), 5 * math.log(0.5)]))
    torch.testing.assert_close(coder.decode(d, ANCHOR), BOX)


def test_round_trip_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 50, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(2, 50, 2, generator=g) * 40 + 0.5], -1)
    axy = torch.rand(50, 2, generator=g) * 50
    anchors = torch.cat([axy, axy + torch.rand(50, 2, generator=g) * 30 + 4], -1)
    for coder in (BoxCoder(), BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))):
        deltas = coder.encode(boxes, anchors)
        torch.testing.assert_close(coder.decode(deltas, anchors), boxes, rtol=1e-5, atol=1e-5)
        # And the other way round: deltas -> boxes -> deltas.
        d = torch.randn(2, 50, 4, generator=g)
        torch.testing.assert_close(coder.encode(coder.decode(d, anchors), anchors), d, rtol=1e-5, atol=1e-5)


def test_broadcasting_over_leading_dims():
    g = torch.Generator().manual_seed(1)
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 20.0, 12.0], [1.0, 2.0, 3.0, 7.0]])
    xy = torch.rand(4, 3, 2, generator=g) * 10
    boxes = torch.cat([xy, xy + 1 + torch.rand(4, 3, 2, generator=g) * 10], -1)
    coder = BoxCoder()
    broadcast = coder.encode(boxes, anchors)  # [4, 3, 4] with [3, 4]
    assert broadcast.shape == (4, 3, 4)
    torch.testing.assert_close(broadcast, coder.encode(boxes, anchors.expand(4, 3, 4)))
    torch.testing.assert_close(broadcast[2, 1], coder.encode(boxes[2, 1], anchors[1]))
    assert coder.decode(torch.zeros(5, 1, 4), anchors).shape == (5, 3, 4)


def test_decode_clamps_large_sizes():
    anchor = torch.tensor([0.0, 0.0, 16.0, 16.0])
    out = BoxCoder().decode(torch.tensor([0.0, 0.0, 50.0, 50.0]), anchor)
    # clamp = log(1000 / 16): a 16-pixel anchor grows to at most 1000 pixels.
    torch.testing.assert_close(out, torch.tensor([-492.0, -492.0, 508.0, 508.0]))
    # The clamp applies to dw / ww: with ww = 5 a delta of 5 * log(2) is not clamped, 5 * 50 is.
    weighted = BoxCoder(weights=(1.0, 1.0, 5.0, 5.0))
    torch.testing.assert_close(
        weighted.decode(torch.tensor([0.0, 0.0, 5 * math.log(2.0), 250.0]), anchor),
        torch.tensor([-8.0, -492.0, 24.0, 508.0]),
    )
    unclamped = BoxCoder(clamp=None).decode(torch.tensor([0.0, 0.0, 2.0, 100.0]), anchor)
    assert unclamped[2] - unclamped[0] == pytest.approx(16 * math.exp(2.0), rel=1e-6)
    assert torch.isinf(unclamped[3])  # exp(100) overflows float32 without the clamp
    # Large negative deltas shrink the box to its centre, never past it.
    tiny = BoxCoder().decode(torch.tensor([0.0, 0.0, -200.0, -200.0]), anchor)
    torch.testing.assert_close(tiny, torch.full((4,), 8.0))


def test_degenerate_boxes_stay_finite():
    coder = BoxCoder()
    zero_box = torch.tensor([5.0, 5.0, 5.0, 5.0])
    d = coder.encode(zero_box, torch.tensor([0.0, 0.0, 10.0, 10.0]))
    assert torch.isfinite(d).all()
    assert d[2].item() == pytest.approx(math.log(1e-8 / 10), rel=1e-4)
    # A zero-size anchor does not give inf / NaN either.
    assert torch.isfinite(coder.encode(torch.tensor([0.0, 0.0, 1.0, 1.0]), zero_box)).all()


def test_low_precision_inputs_compute_in_float32():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0]], dtype=torch.bfloat16)
    d = torch.tensor([[0.1, -0.2, 0.3, 0.05]], dtype=torch.bfloat16)
    out = coder.decode(d, anchors)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, coder.decode(d.float(), anchors.float()))
    enc = coder.encode(out.half(), anchors)
    assert enc.dtype == torch.float32
    # float64 inputs are computed (and returned) in float32 too.
    assert coder.encode(out.double(), anchors.double()).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs",
    [{"weights": (1.0, 1.0, 1.0)}, {"weights": (1.0, 0.0, 1.0, 1.0)}, {"clamp": math.inf}, {"eps": -1.0}],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        BoxCoder(**kwargs)
