"""effdet, the reference: its model for the configured detector, converted into this project's, and its predict
and training steps run the way this project's are."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from benchmarks.options import BenchmarkError
from benchmarks.train_step import sgd, working_copy
from inference.fast_paths import CapturedCall, FastPaths, compile_module

__all__ = ["EffdetReference", "detection_agreement", "effdet_train_step", "effdet_variant_for"]


def effdet_variant_for(cfg: DictConfig) -> str:
    """effdet's name of the configured model (``backbone=b0`` -> ``efficientdet_d0``, ``tf_b0`` -> ``tf_..``)."""
    from models.effdet_convert import EFFDET_VARIANTS

    prefix = "tf_efficientdet" if cfg.padding == "same" else "efficientdet"
    name = f"{prefix}_{cfg.scale}"
    if name not in EFFDET_VARIANTS:
        known = sorted(EFFDET_VARIANTS)
        raise BenchmarkError(f"compare=effdet: effdet has no {name} this project converts; use one of {known}")
    return name


class EffdetReference:
    """effdet's model for the configured detector, with this project's model loaded with the same weights."""

    def __init__(self, cfg: DictConfig, task, size: tuple[int, int], calibrate: Callable[[torch.nn.Module], None]
                 ) -> None:
        try:
            import effdet
        except ImportError as err:
            raise BenchmarkError("compare=effdet needs effdet: pip install -e '.[bench]'") from err
        from backbones.timm_backbone import WeightsMismatchError
        from models.effdet_convert import convert_effdet_state_dict

        self.effdet = effdet
        self.name = effdet_variant_for(cfg)
        num_classes = task.num_classes
        self.model = effdet.create_model(
            self.name, pretrained=False, pretrained_backbone=False, num_classes=num_classes, image_size=size
        ).eval()
        if cfg.effdet_checkpoint:
            self._load(cfg, num_classes)
        else:
            calibrate(self.model)  # before the conversion: both models get the same statistics
        try:
            converted = convert_effdet_state_dict(self.model.state_dict(), variant=self.name, num_classes=num_classes)
            task.model.load_state_dict(converted)
        except (WeightsMismatchError, RuntimeError) as err:
            raise BenchmarkError(f"compare=effdet: the configured model is not effdet's {self.name}: {err}") from None

    def _load(self, cfg: DictConfig, num_classes: int) -> None:
        """Loads ``effdet_checkpoint`` (a state dict, or a checkpoint holding one as ``state_dict``)."""
        path = cfg.effdet_checkpoint
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
            raise BenchmarkError(f"effdet_checkpoint={path}: cannot be read as a state dict: {err}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise BenchmarkError(f"effdet_checkpoint={path}: holds a {type(state).__name__}, not a state dict")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise BenchmarkError(
                f"effdet_checkpoint={path} is not a state dict of effdet's {self.name} with {num_classes} classes "
                f"(the model configured here: backbone={cfg.backbone.name}, data.num_classes): "
                f"{' '.join(line.strip() for line in first[:3])}"
            ) from None

    def predictor(self, paths: FastPaths, device: torch.device, size: tuple[int, int]):
        """effdet's predict call (network, decoding, NMS) on a batch of images of ``size``, with ``paths``."""
        model = working_copy(self.model, paths, device, train=False)
        bench = self.effdet.DetBenchPredict(model).to(device).eval()
        if paths.compile:  # torch's CUDA graphs of the compiled network when paths.cudagraphs
            bench.model = compile_module(model, paths)
        graphed = not paths.compile and paths.cudagraphs and device.type == "cuda"
        if graphed:  # the eager network as a CUDA graph (its NMS waits for the host: only the network is captured)
            bench.model = _GraphedModule(model)
        h, w = size
        infos: dict[int, dict[str, torch.Tensor]] = {}  # per batch size, made once (a host-to-device copy waits)

        @torch.inference_mode()
        def predict(images: torch.Tensor):
            b = images.shape[0]
            if paths.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if paths.compile and paths.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            if b not in infos:
                infos[b] = {"img_scale": torch.ones(b, device=device),
                            "img_size": torch.tensor([[w, h]] * b, device=device)}
            info = infos[b]
            with paths.autocast(device, cache_enabled=not graphed):  # cache off when a graph may be captured
                return bench(images, img_info=info)

        return predict

    def trainer(self, paths: FastPaths, device: torch.device):
        """effdet's training bench (network, anchor labeller, loss) on a working copy, and that copy."""
        model = working_copy(self.model, paths, device, train=True)
        bench = self.effdet.DetBenchTrain(model, create_labeler=True).to(device)
        bench.model = compile_module(model, paths, training=True)
        return bench, model


class _GraphedModule(torch.nn.Module):
    """``module`` called through :class:`inference.fast_paths.CapturedCall` (a module, so it can stand in for one)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = module
        self._call = CapturedCall(module)

    def forward(self, x: torch.Tensor):
        return self._call(x)


def effdet_train_step(ref: EffdetReference, paths: FastPaths, device, x, boxes, labels) -> Callable[[], None]:
    """effdet's training step on ``x`` and its targets: forward, its labeller and loss, backward, SGD step."""
    bench, model = ref.trainer(paths, device)
    if paths.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = sgd(model)
    # effdet's targets: yxyx boxes, classes counted from 1.
    target = {"bbox": boxes[..., [1, 0, 3, 2]].float(), "cls": (labels + 1).float()}

    def step() -> None:
        with paths.autocast(device):
            loss = bench(x, target)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def detection_agreement(ours: dict, theirs: torch.Tensor, cls_diff: float) -> dict[str, Any]:
    """Detections of the same weights: sorted scores compared position by position, and the share of this
    project's boxes that effdet also found (same class, IoU > 0.99)."""
    from torchvision.ops import box_iou

    matched = total = 0
    score_diff = 0.0
    for i in range(theirs.shape[0]):
        n = int(ours["num_detections"][i])
        ref = theirs[i][theirs[i, :, 4] > 0]
        m = min(n, ref.shape[0])
        a = ours["scores"][i, :m].float().sort(descending=True).values
        b = ref[:m, 4].float().sort(descending=True).values
        if m:
            score_diff = max(score_diff, float((a - b).abs().max()))
            iou = box_iou(ours["boxes"][i, :n].float(), ref[:, :4].float())
            same = ours["labels"][i, :n, None] + 1 == ref[None, :, 5].long()
            matched += int(((iou > 0.99) & same).any(1).sum())
        total += n
    return {"max_class_logit_diff": cls_diff, "max_sorted_score_diff": score_diff,
            "detections_matched": matched / max(total, 1), "detections": total}
