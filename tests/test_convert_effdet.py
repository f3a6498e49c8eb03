"""effdet -> effdense weight conversion: same raw outputs and same detections as effdet for the same weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

effdet = pytest.importorskip("effdet")

from backbones.timm_backbone import WeightsMismatchError
from heads import AnchorGenerator, BoxCoder, DetectionPostProcess, flatten_levels
from models.effdet_convert import (
    EFFDET_POSTPROCESS,
    EFFDET_VARIANTS,
    build_effdet_equivalent,
    config_overrides,
    convert_effdet_state_dict,
)
from models.scaling import get_scale

ROOT = Path(__file__).resolve().parent.parent
# (variant, input side): small inputs keep the test fast; effdet's resampling is built for one image size.
# Lite0 at its own 320 px: P7 is 320 / 128 = 2.5 cells, rounded up to 3 (anchors spread over the input as effdet's).
CASES = [("tf_efficientdet_d0", 256), ("tf_efficientdet_d3", 384), ("efficientdet_d0", 256),
         ("tf_efficientdet_lite0", 320), ("tf_efficientdet_lite3", 256)]
# Class channels (anchor * num_classes + class) made confident, so detections are distinct and well separated.
HOT_CHANNELS = (0 * 90 + 3, 4 * 90 + 17, 8 * 90 + 55)
_FUSION = {"fastattn": "fast", "attn": "softmax", "sum": "sum"}
_ACTIVATION = {"swish": "silu", "silu": "silu", "relu6": "relu6"}


def _effdet_model(name: str, size: int) -> torch.nn.Module:
    # effdet initialises its convolutions from the global generator: seeded, every run tests the same weights
    # (unseeded, some draws put two boxes within float rounding of an NMS decision).
    torch.manual_seed(0)
    return effdet.create_model(name, pretrained=False, pretrained_backbone=False, image_size=(size, size))


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Make every tensor that a wrong mapping could get away with distinctive: norms' affine parameters and
    running statistics, conv biases, fusion weights, prediction biases."""
    g = torch.Generator().manual_seed(seed)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            uniform(m.weight, 0.5, 1.5)
            uniform(m.bias, -0.3, 0.3)
            uniform(m.running_mean, -0.3, 0.3)
            uniform(m.running_var, 0.5, 2.0)
        elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            uniform(m.bias, -0.3, 0.3)
        if getattr(m, "edge_weights", None) is not None:
            uniform(m.edge_weights, 0.1, 2.0)
    bias = model.class_net.predict.conv_pw.bias
    uniform(bias, -6.0, -4.0)
    bias[list(HOT_CHANNELS)] += 6.0
    model.class_net.predict.conv_pw.weight[list(HOT_CHANNELS)] *= 4.0  # spread the confident scores


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def pair(request):
    name, size = request.param
    torch.manual_seed(0)
    reference = _effdet_model(name, size).eval()
    _randomize(reference, seed=1)
    ours = build_effdet_equivalent(name).eval()
    ours.load_state_dict(convert_effdet_state_dict(reference.state_dict(), variant=name), strict=True)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_cls, ref_box = reference(x)
        out = ours(x)
    return name, size, reference, x, (ref_cls, ref_box), out


def test_raw_outputs_match(pair):
    name, _, _, _, (ref_cls, ref_box), out = pair
    assert list(out.cls_logits) == [f"p{lv}" for lv in range(3, 8)]
    perm = torch.tensor([1, 0, 3, 2])  # ours (dx, dy, dw, dh) <- effdet (ty, tx, th, tw), per anchor
    worst_cls = worst_box = 0.0
    for i, level in enumerate(out.cls_logits):
        assert ref_cls[i].std() > 0.05 and ref_box[i].std() > 0.05  # the outputs carry signal
        worst_cls = max(worst_cls, (out.cls_logits[level] - ref_cls[i]).abs().max().item())
        b, _, h, w = ref_box[i].shape
        ref = ref_box[i].reshape(b, -1, 4, h, w)[:, :, perm].reshape(b, -1, h, w)
        worst_box = max(worst_box, (out.box_deltas[level] - ref).abs().max().item())
    print(f"{name}: max |cls diff| {worst_cls:.2e}, max |box diff| {worst_box:.2e}")
    assert worst_cls < 1e-4 and worst_box < 1e-4


def test_detections_match(pair):
    name, size, reference, x, _, out = pair
    v = EFFDET_VARIANTS[name]
    bench = effdet.DetBenchPredict(reference).eval()
    with torch.no_grad():
        ref = bench(x, img_info={"img_scale": torch.ones(1), "img_size": torch.tensor([[size, size]])})[0]
    ref = ref[ref[:, 4] > 0]

    # As tasks/detection.py composes them, with the settings the converted config carries.
    anchors = AnchorGenerator(anchor_scale=v.anchor_scale, num_scales=v.num_scales, aspect_ratios=v.aspect_ratios)
    post = DetectionPostProcess(box_coder=BoxCoder(clamp=None), **EFFDET_POSTPROCESS)
    cls = flatten_levels(out.cls_logits, 90)
    box = flatten_levels(out.box_deltas, 4)
    det = post(cls, box, anchors({k: t.shape[-2:] for k, t in out.cls_logits.items()}), (size, size))
    n = int(det["num_detections"][0])
    boxes, scores, labels = det["boxes"][0, :n], det["scores"][0, :n], det["labels"][0, :n]

    assert n == len(ref) and n >= 10
    assert (scores[:10] > 0.5).all()  # confident detections, not a comparison of noise
    assert torch.equal(labels.sort().values, (ref[:, 5].long() - 1).sort().values)  # effdet counts from 1
    assert (scores[:-1] >= scores[1:]).all()
    # Scores closer than float rounding may come out in either order: pair each effdet detection with the
    # unused one of ours of the same class, within the score tolerance, whose box is closest.
    box_diff = score_diff = 0.0
    unused = torch.ones(n, dtype=torch.bool)
    for row in ref:
        ok = unused & (labels == int(row[5]) - 1) & ((scores - row[4]).abs() < 1e-3)
        assert ok.any(), f"no detection of ours matches effdet's {row.tolist()}"
        dist = torch.where(ok, (boxes - row[:4]).abs().amax(1), torch.inf)
        j = int(dist.argmin())
        unused[j] = False
        box_diff = max(box_diff, dist[j].item())
        score_diff = max(score_diff, (scores[j] - row[4]).abs().item())
    print(f"{name}: {n} detections, max |box diff| {box_diff:.2e} px, max |score diff| {score_diff:.2e}")
    assert box_diff < 0.5 and score_diff < 1e-3


@pytest.mark.parametrize("name", sorted(EFFDET_VARIANTS))
def test_variant_table_matches_effdet_config(name):
    v = EFFDET_VARIANTS[name]
    c = effdet.get_efficientdet_config(name)
    assert (v.backbone, v.image_size, v.fpn_channels, v.fpn_repeats, v.head_depth) == (
        c.backbone_name, c.image_size[0], c.fpn_channels, c.fpn_cell_repeats, c.box_class_repeats
    )
    assert (v.min_level, v.max_level, v.num_scales, v.anchor_scale) == (c.min_level, c.max_level, c.num_scales,
                                                                         c.anchor_scale)
    assert [tuple(r) for r in c.aspect_ratios] == list(v.aspect_ratios)
    assert v.fusion == _FUSION[effdet.config.get_fpn_config(c.fpn_name).nodes[0]["weight_method"]]
    assert v.padding == ("same" if c.pad_type == "same" else "native")
    assert v.redundant_bias == c.redundant_bias
    assert v.backbone_drop_path == c.backbone_args["drop_path_rate"]
    assert v.activation == _ACTIVATION[c.act_type] and c.head_act_type is None
    assert (c.separable_conv, c.apply_resample_bn, c.conv_bn_relu_pattern) == (True, True, False)
    assert (c.downsample_type, c.upsample_type, c.head_bn_level_first) == ("max", "nearest", False)
    assert (c.max_detection_points, c.max_det_per_image, c.soft_nms) == (
        EFFDET_POSTPROCESS["topk"], EFFDET_POSTPROCESS["max_detections"], False
    )
    # The only field where effdet and this project's scaling table differ.
    expected = {"backbone_drop_path": 0.1} if name == "efficientdet_d0" else {}
    assert v.row_overrides() == expected
    assert get_scale(v.scale).backbone == v.backbone.removeprefix("tf_")


def test_composed_config_builds_the_converted_model():
    from hydra.utils import instantiate

    from tasks.config import compose

    # Native and "same" padding, a 4-deep head, D7 (B6 backbone on the D7 row), D7x (P3-P8).
    # Lite0 (ReLU6, sum fusion) and Lite3x (the Lite3 backbone on its own row).
    for name in ("tf_efficientdet_d0", "efficientdet_d0", "tf_efficientdet_d3", "tf_efficientdet_d7",
                 "tf_efficientdet_d7x", "tf_efficientdet_lite0", "tf_efficientdet_lite3x"):
        cfg = compose("train", config_overrides(name, num_classes=90))
        with torch.device("meta"):
            composed = instantiate(cfg.model).state_dict()
            built = build_effdet_equivalent(name).state_dict()
        assert {k: v.shape for k, v in composed.items()} == {k: v.shape for k, v in built.items()}, name
        assert cfg.model.image_size == EFFDET_VARIANTS[name].image_size
        assert instantiate(cfg.model.neck.act_layer) is instantiate(cfg.model.head.act_layer)
        assert cfg.model.neck.act_layer.name == EFFDET_VARIANTS[name].activation


def test_unmapped_and_missing_keys_are_named():
    state = _effdet_model("tf_efficientdet_d0", 256).state_dict()
    extra = dict(state, **{"fpn.cell.0.fnode.99.combine.edge_weights": torch.ones(2)})
    with pytest.raises(WeightsMismatchError, match=r"fnode\.99"):
        convert_effdet_state_dict(extra, variant="tf_efficientdet_d0")
    fewer = {k: v for k, v in state.items() if not k.startswith("box_net.bn_rep.1.")}
    with pytest.raises(WeightsMismatchError, match=r"missing keys.*head\.box_net\.norms\.1\.0"):
        convert_effdet_state_dict(fewer, variant="tf_efficientdet_d0")


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_weights.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )


def test_tool_end_to_end(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tasks.config import register_resolvers

    name, size = "tf_efficientdet_d0", 256
    reference = _effdet_model(name, size).eval()
    _randomize(reference, seed=3)
    src = tmp_path / "effdet.pth"
    torch.save({"state_dict_ema": reference.state_dict()}, src)
    dst = tmp_path / "out" / "converted.ckpt"
    res = _run_tool("--src", str(src), "--variant", name, "--dst", str(dst))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in dst.parent.iterdir()) == ["converted.ckpt"]  # no temporary file left

    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    assert ckpt["effdense_source"] == {"variant": name, "file": str(src.resolve())}
    cfg = ckpt["effdense_config"]
    assert cfg["data"]["num_classes"] == 90 and cfg["box_coder"]["clamp"] is None
    assert cfg["anchors"]["anchor_scale"] == 4.0 and cfg["model"]["image_size"] == 512
    assert {k: cfg["task"]["module"]["postprocess"][k] for k in EFFDET_POSTPROCESS} == EFFDET_POSTPROCESS
    register_resolvers()
    model = instantiate(OmegaConf.create(cfg["model"])).eval()
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}, strict=True)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref_cls, ref_box = reference(x)
        out = model(x)
    for i, level in enumerate(out.cls_logits):
        assert (out.cls_logits[level] - ref_cls[i]).abs().max() < 1e-4
        b, _, h, w = ref_box[i].shape
        ref = ref_box[i].reshape(b, -1, 4, h, w)[:, :, [1, 0, 3, 2]].reshape(b, -1, h, w)
        assert (out.box_deltas[level] - ref).abs().max() < 1e-4

    # d0 weights declared as d1: exit status 2, one line naming the mismatched keys, nothing written.
    bad = tmp_path / "bad" / "d1.ckpt"
    res = _run_tool("--src", str(src), "--variant", "tf_efficientdet_d1", "--dst", str(bad))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error:")
    assert "neck.extra.0.0.conv.weight" in res.stderr and "missing keys" in res.stderr
    assert not bad.exists() and not (bad.parent.exists() and any(bad.parent.iterdir()))


@pytest.mark.parametrize(("name", "size", "mean", "std"), [
    ("tf_efficientdet_d0", 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("tf_efficientdet_d3", 384, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("tf_efficientdet_lite0", 320, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # effdet's Lite input normalisation
])
def test_convert_then_predict_matches_effdet_on_an_image_file(tmp_path, name, size, mean, std):
    """The user's path: effdet weights file -> tools/convert_weights.py -> Predictor on an image file gives
    effdet's detections (boxes within 0.5 px, scores within 1e-3) with COCO class names, the input normalised as
    effdet's config for the variant says."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    config = effdet.get_efficientdet_config(name)  # effdet's loaders fall back on ImageNet's
    assert tuple(config.get("mean") or IMAGENET_DEFAULT_MEAN) == mean
    assert tuple(config.get("std") or IMAGENET_DEFAULT_STD) == std
    import cv2
    import numpy as np

    from inference.predictor import Predictor

    sys.path.insert(0, str(ROOT / "tools"))
    from convert_weights import convert

    reference = _effdet_model(name, size).eval()
    _randomize(reference, seed=4)
    src = tmp_path / "effdet.pth"
    torch.save(reference.state_dict(), src)
    dst = tmp_path / "converted.ckpt"
    convert(src, name, dst, 90)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    predictor = Predictor.from_checkpoint(dst, overrides=[f"model.image_size={size}"])
    (result,) = predictor(path)

    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0 - mean) / std
    bench = effdet.DetBenchPredict(reference).eval()
    with torch.no_grad():
        ref = bench(x, img_info={"img_scale": torch.ones(1), "img_size": torch.tensor([[size, size]])})[0]
    ref = ref[ref[:, 4] > 0.3]
    scores = torch.tensor(result["scores"])
    boxes = torch.tensor(result["boxes"]).reshape(-1, 4)
    labels = torch.tensor(result["labels"])
    assert len(ref) >= 5 and len(result["scores"]) >= len(ref)
    for row in ref:
        ok = (labels == int(row[5]) - 1) & ((scores - row[4]).abs() < 1e-3)
        assert ok.any(), f"no detection matches effdet's {row.tolist()}"
        assert (boxes[ok] - row[:4]).abs().amax(1).min() < 0.5
    from datasets.coco_names import coco_label_names

    assert result["names"][:5] == [coco_label_names()[k] for k in result["labels"][:5]]
