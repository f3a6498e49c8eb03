"""AnchorGenerator: exact coordinates, counts, ordering (matching the flattened head outputs), cache."""

from __future__ import annotations

import math

import pytest
import torch

from heads.anchors import AnchorGenerator

R = 2.0 ** (1.0 / 3.0)  # octave step for num_scales=3


def test_single_cell_p3_default_anchors_exact():
    # p3: stride 8, the only cell is centred at (4, 4). Base sizes 4 * 8 * 2**(o/3) = 32, 32*R, 32*R**2.
    anchors = AnchorGenerator()({"p3": (1, 1)})
    assert anchors.shape == (9, 4) and anchors.dtype == torch.float32
    # Octave 0 written out by hand: (1, 1) -> 32x32; (1.4, 0.7) -> 44.8x22.4; (0.7, 1.4) -> 22.4x44.8.
    torch.testing.assert_close(
        anchors[:3],
        torch.tensor([[-12.0, -12.0, 20.0, 20.0], [-18.4, -7.2, 26.4, 15.2], [-7.2, -18.4, 15.2, 26.4]]),
    )
    expected = []
    for octave in range(3):
        base = 32.0 * R**octave
        for ax, ay in ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)):
            hw, hh = base * ax / 2, base * ay / 2
            expected.append([4 - hw, 4 - hh, 4 + hw, 4 + hh])
    torch.testing.assert_close(anchors, torch.tensor(expected))
    # Octave 2, ratio (1, 1): 32 * 2**(2/3) = 50.7968... wide.
    assert anchors[6, 2] - anchors[6, 0] == pytest.approx(50.79683366298238, rel=1e-6)


def test_two_by_two_p3_single_anchor_exact_and_row_major():
    gen = AnchorGenerator(anchor_scale=1.0, num_scales=1, aspect_ratios=[(1.0, 1.0)])
    anchors = gen({"p3": (2, 2)})
    # Cells in (y, x) order: (0,0), (0,1), (1,0), (1,1); one 8x8 anchor per cell.
    expected = torch.tensor(
        [[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [0.0, 8.0, 8.0, 16.0], [8.0, 8.0, 16.0, 16.0]]
    )
    assert torch.equal(anchors, expected)


def test_count_matches_feature_shapes():
    gen = AnchorGenerator()
    shapes = {"p3": (16, 32), "p4": (8, 16), "p5": (4, 8), "p6": (2, 4), "p7": (1, 2)}  # a 128 x 256 input
    anchors = gen(shapes)
    assert gen.num_anchors == 9
    assert anchors.shape == ((512 + 128 + 32 + 8 + 2) * 9, 4)
    assert torch.isfinite(anchors).all()
    # p4 block starts after the 512 * 9 p3 anchors: cell (0, 0) of stride 16, first anchor 64x64.
    torch.testing.assert_close(anchors[512 * 9], torch.tensor([8.0 - 32, 8.0 - 32, 8.0 + 32, 8.0 + 32]))
    # Last anchor: p7 (stride 128) cell (0, 1), octave 2, ratio (0.7, 1.4).
    base = 4 * 128 * R**2
    last = torch.tensor([192 - base * 0.35, 64 - base * 0.7, 192 + base * 0.35, 64 + base * 0.7])
    torch.testing.assert_close(anchors[-1], last)


def test_order_matches_flattened_head_outputs():
    """Anchor i must describe the prediction at flat index i of ``permute(0, 2, 3, 1).reshape(B, -1, K)``."""
    gen = AnchorGenerator(anchor_scale=2.0, num_scales=2, aspect_ratios=[(1.0, 1.0), (2.0, 0.5)])
    shapes = {"p3": (4, 8), "p5": (1, 2)}  # a 32 x 64 input
    n = gen.num_anchors
    flat = []
    for name, (h, w) in shapes.items():
        stride = 2 ** int(name[1:])
        # A fake head output [1, n * 4, H, W] whose channel a * 4 + j holds coordinate j of anchor a at (y, x).
        out = torch.zeros(1, n * 4, h, w, dtype=torch.float64)
        for y in range(h):
            for x in range(w):
                cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
                for a in range(n):
                    octave, ratio = divmod(a, 2)
                    ax, ay = ((1.0, 1.0), (2.0, 0.5))[ratio]
                    size = 2.0 * stride * 2 ** (octave / 2)
                    box = [cx - size * ax / 2, cy - size * ay / 2, cx + size * ax / 2, cy + size * ay / 2]
                    out[0, a * 4 : a * 4 + 4, y, x] = torch.tensor(box, dtype=torch.float64)
        flat.append(out.permute(0, 2, 3, 1).reshape(1, -1, 4))
    expected = torch.cat(flat, dim=1)[0]
    anchors = gen(shapes, dtype=torch.float64)
    assert anchors.dtype == torch.float64
    torch.testing.assert_close(anchors, expected, rtol=0, atol=1e-12)


def test_cache_returns_same_tensor_per_key():
    gen = AnchorGenerator()
    a = gen({"p3": (4, 4), "p4": (2, 2)})
    b = gen({"p3": (4, 4), "p4": (2, 2)})
    c = gen({"p3": (4, 4), "p4": (2, 2)}, dtype=torch.float64)
    d = gen({"p3": (4, 5), "p4": (2, 3)})
    assert a is b
    assert c is not a and c.dtype == torch.float64
    torch.testing.assert_close(c.float(), a)
    assert d.shape[0] == (20 + 6) * 9
    for i in range(40):  # the cache stays bounded
        gen({"p3": (1, i + 1)})
    assert len(gen._cache) <= AnchorGenerator._MAX_CACHE


def test_num_anchors_follows_arguments():
    gen = AnchorGenerator(num_scales=2, aspect_ratios=[(1.0, 1.0), (1.0, 2.0), (2.0, 1.0), (3.0, 1.0)])
    assert gen.num_anchors == 8
    assert gen({"p4": (3, 2)}).shape == (3 * 2 * 8, 4)
    # Every anchor of a cell shares the cell centre.
    anchors = gen({"p4": (1, 1)})
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    torch.testing.assert_close(centers, torch.full((8, 2), 8.0))
    widths = anchors[:, 2] - anchors[:, 0]
    assert widths[7].item() == pytest.approx(4 * 16 * math.sqrt(2) * 3.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"anchor_scale": 0.0},
        {"anchor_scale": -1.0},
        {"num_scales": 0},
        {"num_scales": 1.5},
        {"aspect_ratios": []},
        {"aspect_ratios": [(1.0, 0.0)]},
        {"aspect_ratios": [(1.0, 1.0, 1.0)]},
        {"aspect_ratios": [1.0, 2.0]},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        AnchorGenerator(**kwargs)


def test_invalid_feature_shapes_raise():
    gen = AnchorGenerator()
    with pytest.raises(ValueError, match="increasing"):
        gen({"p4": (2, 2), "p3": (4, 4)})
    with pytest.raises(ValueError):
        gen({"res3": (4, 4)})
    with pytest.raises(ValueError):
        gen({})


def test_device_argument():
    gen = AnchorGenerator()
    assert gen({"p3": (1, 1)}, device="cpu").device.type == "cpu"
    if torch.cuda.is_available():
        a = gen({"p3": (2, 2)}, device="cuda")
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), gen({"p3": (2, 2)}))


@pytest.mark.parametrize("size", [320, 448, (320, 448), 512])
def test_maps_rounded_up_spread_over_the_input_as_effdets(size):
    """EfficientDet-Lite0 (320) and Lite2 (448) inputs are not multiples of P7's 128: the rounded-up coarse maps
    get effdet's anchors (stride = input extent / map size), the others ``2**l`` strides as before."""
    effdet = pytest.importorskip("effdet")
    h, w = (size, size) if isinstance(size, int) else size
    shapes, fh, fw = {}, h, w
    for level in range(1, 8):
        fh, fw = -(-fh // 2), -(-fw // 2)  # "same" padding: each stride-2 step rounds up
        if level >= 3:
            shapes[f"p{level}"] = (fh, fw)
    ours = AnchorGenerator(anchor_scale=3.0)(shapes, dtype=torch.float64)
    ref = effdet.anchors.Anchors(3, 7, 3, [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)], 3.0, (h, w)).boxes.double()
    torch.testing.assert_close(ours, ref[:, [1, 0, 3, 2]], rtol=0, atol=1e-4)  # effdet's boxes are yxyx
    if size == 320:
        p7 = ours[-9 * 9:]  # 3 x 3 cells of 320 / 3 px
        assert p7[4 * 9, 0] + p7[4 * 9, 2] == pytest.approx(2 * 160.0)  # the middle cell is centred at 160
