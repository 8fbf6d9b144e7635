"""TrainConfig: every knob of a training run, validated, loadable from YAML, stored in
checkpoints (so a checkpoint says exactly how it was made, and ``--resume`` needs nothing
else)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.model.spec import DecodeMode, Interpolation, Preprocessing, ResizeMode, Task
from training.models import BACKBONES, backbone_info
from training.presets import AugmentConfig


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # data
    data: Path
    manifest: Path | None = Field(default=None, description="box manifest (default: auto)")
    output: Path = Path("runs/run")
    verify_images: bool = True
    cache_images: bool = Field(
        default=False, description="keep decoded images in RAM (small datasets only)"
    )

    # model
    backbone: str = "resnet18"
    pretrained: bool = True
    weights_file: Path | None = None
    input_size: int = Field(default=224, ge=32)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    glimpse_size: int = Field(
        default=0,
        ge=0,
        description="localization only: also classify a NxN window of the input at the "
        "predicted box and add its logits to the classifier's (0: off; 16 for the demo)",
    )

    # eval preprocessing (= the ModelSpec's); None picks center_crop for classification and
    # letterbox for localization
    resize_mode: ResizeMode | None = None
    crop_fraction: float = Field(default=0.875, gt=0, le=1)
    interpolation: Interpolation = Interpolation.BILINEAR
    pad_value: int = Field(default=114, ge=0, le=255)
    jpeg_draft: bool = Field(
        default=True,
        description="evaluate (and so serve) JPEGs decoded at the smallest DCT scale that "
        "covers the input: the ModelSpec records it, so serving decodes the same way",
    )

    augment: AugmentConfig = AugmentConfig()

    # schedule and optimisation
    epochs: int = Field(default=10, ge=1)
    freeze_epochs: int = Field(default=1, ge=0, description="stage 1: heads only")
    unfreeze: Literal["all"] | int = Field(default="all", description="stage 2: top N blocks")
    batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    backbone_lr_mult: float = Field(default=0.1, gt=0, le=1)
    weight_decay: float = Field(default=0.05, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    warmup_epochs: float = Field(default=1.0, ge=0)
    min_lr_ratio: float = Field(default=0.01, ge=0, le=1)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    grad_clip: float | None = Field(default=5.0, gt=0)
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    class_balance: Literal["none", "sampler", "loss"] = "none"
    box_loss_weight: float = Field(default=1.0, ge=0)

    # runtime
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = Field(default=1, ge=0)
    channels_last: bool = Field(default=True, description="NHWC convolutions (faster on CPU)")
    threads: int | None = Field(default=None, ge=1)
    tensorboard: bool = False
    keep_epoch_checkpoints: bool = False

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose one of: {', '.join(BACKBONES)}")
        return value

    @field_validator("unfreeze")
    @classmethod
    def _positive_blocks(cls, value: Literal["all"] | int) -> Literal["all"] | int:
        if value != "all" and int(value) < 1:
            raise ValueError("unfreeze must be 'all' or a number of top blocks >= 1")
        return value

    @model_validator(mode="after")
    def _stages_fit(self) -> TrainConfig:
        if self.freeze_epochs > self.epochs:
            raise ValueError(f"freeze_epochs ({self.freeze_epochs}) > epochs ({self.epochs})")
        info = backbone_info(self.backbone)
        if self.input_size < info.min_input:
            raise ValueError(
                f"{self.backbone} needs input_size >= {info.min_input} (its strides leave no "
                f"feature map below that); got {self.input_size}"
            )
        if self.pretrained and self.weights_file is None and not info.torchvision:
            raise ValueError(
                f"{self.backbone} has no pretrained weights (it is not in torchvision): "
                "set pretrained: false (--no-pretrained) or give a weights_file"
            )
        return self

    @property
    def from_scratch(self) -> bool:
        return not self.pretrained and self.weights_file is None

    def preprocessing(self, task: Task) -> Preprocessing:
        """The eval preset's parameters, which the exported ModelSpec carries verbatim."""
        mode = self.resize_mode or (
            ResizeMode.CENTER_CROP if task is Task.CLASSIFICATION else ResizeMode.LETTERBOX
        )
        resize = (
            int(self.input_size / self.crop_fraction)
            if mode is ResizeMode.CENTER_CROP
            else self.input_size
        )
        return Preprocessing(
            resize_mode=mode,
            resize_size=resize,
            interpolation=self.interpolation,
            pad_value=self.pad_value,
            decode=DecodeMode.JPEG_DRAFT if self.jpeg_draft else DecodeMode.FULL,
        )

    @classmethod
    def from_sources(
        cls,
        path: Path | None,
        overrides: dict[str, Any] | None = None,
        *,
        augment: dict[str, Any] | None = None,
    ) -> TrainConfig:
        """Defaults, then a YAML file, then ``overrides`` (e.g. CLI flags that were given)."""
        data: dict[str, Any] = {}
        if path is not None:
            with open(path) as handle:
                data = yaml.safe_load(handle) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        if augment:
            data["augment"] = {**(data.get("augment") or {}), **augment}
        return cls.model_validate(data)
