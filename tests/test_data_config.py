"""One preprocessing config: DataConfig against each library's own transform, pixel for pixel."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import unifeat
from unifeat import DataConfig, create_transform, data_config
from unifeat._data import from_open_clip, from_torchvision, from_transformers


def _images() -> list[Image.Image]:
    """Odd sizes and aspect ratios: wide, tall, smaller than the crop, square, 1 pixel high."""
    generator = np.random.RandomState(0)
    sizes = [(320, 200), (199, 301), (150, 100), (224, 224), (517, 389), (40, 1)]
    return [Image.fromarray((generator.rand(h, w, 3) * 255).astype(np.uint8)) for w, h in sizes]


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 0.0) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert (ours - theirs).abs().max().item() <= atol


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",  # center, bicubic, crop_pct 0.95
        "vit_tiny_patch16_224",  # mean/std 0.5
        "mobilenetv3_small_100",  # bilinear, 0.875
        "convnext_atto",  # crop_pct 0.95, test size
        "deit_tiny_patch16_224",
        "resnet50.fb_swsl_ig1b_ft_in1k",  # bilinear
    ],
)
def test_timm_configs_give_timms_own_pixels(name: str) -> None:
    import timm
    from timm.data import create_transform as timm_transform
    from timm.data import resolve_data_config

    with torch.device("meta"):
        native = timm.create_model(name)
    theirs = timm_transform(**resolve_data_config({}, model=native))
    config = data_config(f"timm:{name}")
    assert config.source == "timm pretrained_cfg"
    ours = create_transform(config)
    for image in _images():
        _assert_same(ours(image), theirs(image))


@pytest.mark.parametrize("mode", ["squash", "border", "center"])
@pytest.mark.parametrize("size", [(224, 224), (160, 256)])
def test_timm_crop_modes_and_non_square_sizes(mode: str, size: tuple[int, int]) -> None:
    """Every crop mode timm has (a few pretrained configs use squash and border)."""
    from timm.data import create_transform as timm_transform

    recipe = dict(
        input_size=(3, *size),
        interpolation="bilinear",
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.25, 0.3),
        crop_pct=0.9,
        crop_mode=mode,
    )
    theirs = timm_transform(**recipe)
    ours = create_transform(DataConfig(**recipe))
    for image in _images():
        _assert_same(ours(image), theirs(image))


@pytest.mark.parametrize(
    "weights",
    [
        "ResNet50_Weights.IMAGENET1K_V1",  # resize 256, crop 224, bilinear
        "ResNet50_Weights.IMAGENET1K_V2",  # resize 232
        "Inception_V3_Weights.IMAGENET1K_V1",  # 342 / 299
        "EfficientNet_B3_Weights.IMAGENET1K_V1",  # 320 / 300, bicubic
        "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1",  # 384 / 384, bicubic
    ],
)
def test_torchvision_weights_transforms(weights: str) -> None:
    """Their transforms() need no download; run on PIL images, as extraction does."""
    import torchvision

    enum_name, member = weights.split(".")
    theirs = getattr(getattr(torchvision.models, enum_name), member).transforms()
    config = from_torchvision(theirs)
    assert config.source.startswith("torchvision weights transforms")
    assert config.size == (theirs.crop_size[0], theirs.crop_size[0])
    ours = create_transform(config)
    for image in _images():
        _assert_same(ours(image), theirs(image))


def _processors() -> list[object]:
    from transformers import (
        BitImageProcessor,
        CLIPImageProcessor,
        ConvNextImageProcessor,
        DeiTImageProcessor,
        ViTImageProcessor,
    )

    return [
        ViTImageProcessor(size={"height": 48, "width": 64}, image_mean=[0.1, 0.2, 0.3]),
        ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875),
        ConvNextImageProcessor(size={"shortest_edge": 384}),
        CLIPImageProcessor(),
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}),
        DeiTImageProcessor(),
    ]


@pytest.mark.parametrize("index", range(6))
def test_transformers_image_processors(index: int) -> None:
    """transformers' default processors resize uint8 tensors with torchvision
    kernels and fold rescaling into the normalization; reproduced exactly."""
    processor = _processors()[index]
    config = from_transformers(processor)
    assert config.impl == "transformers" and "image processor" in config.source
    ours = create_transform(config)
    for image in _images()[:5]:
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        _assert_same(ours(image), theirs)


def test_transformers_pil_backend_processor_is_close() -> None:
    """The PIL-backend processors differ in float arithmetic only."""
    from transformers import ViTImageProcessorPil

    processor = ViTImageProcessorPil(size={"height": 40, "width": 40})
    ours = create_transform(from_transformers(processor))
    for image in _images()[:5]:
        theirs = torch.as_tensor(processor(images=image, return_tensors="np")["pixel_values"][0])
        _assert_same(ours(image), theirs, atol=1e-5)


@pytest.mark.parametrize(
    ("resize_mode", "fill"), [("shortest", 0), ("squash", 0), ("longest", (123, 117, 104))]
)
def test_open_clip_preprocess(resize_mode: str, fill: object) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    theirs = image_transform_v2(
        PreprocessCfg(
            size=(96, 96), resize_mode=resize_mode, interpolation="bicubic", fill_color=fill
        ),
        is_train=False,
    )
    config = from_open_clip(theirs)
    assert config.source == "open_clip preprocess"
    ours = create_transform(config)
    for image in _images():
        _assert_same(ours(image), theirs(image))


def test_open_clip_padding_other_than_the_mean_colour_is_refused() -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    black = image_transform_v2(PreprocessCfg(size=(96, 96), resize_mode="longest"), False)
    with pytest.raises(unifeat.UnsupportedOptionError, match="pads with fill 0"):
        from_open_clip(black)


def test_open_clip_model_preprocess() -> None:
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, theirs = open_clip.create_model_and_transforms("RN50", pretrained=None)
    ours = create_transform(from_open_clip(theirs))
    for image in _images()[:3]:
        _assert_same(ours(image), theirs(image))


def test_open_clip_feature_models_carry_their_preprocess() -> None:
    from unifeat._feature_model import image_transform

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = unifeat.create_model(
            "oc:ViT-B-32",
            features_only=True,
            layers=2,
            width=64,
            head_width=32,
            image_size=64,
            patch_size=16,
        )
    config = data_config(model)
    assert config.source == "open_clip preprocess" and config.size == (64, 64)
    theirs = image_transform(model)
    for image in _images():
        _assert_same(create_transform(config)(image), theirs(image))


def test_random_init_models_get_the_documented_default() -> None:
    """Resize the shorter side to size / 0.875 (bicubic), center-crop, ImageNet mean and std."""
    from torchvision import transforms

    config = data_config("tv:resnet18")
    assert config.source.startswith("default")
    expected = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    ours = create_transform("tv:resnet18")
    for image in _images():
        _assert_same(ours(image), expected(image))
    # A model made for another input size keeps its size.
    assert data_config("tv:inception_v3", init_weights=False).input_size == (3, 299, 299)


def test_data_config_of_models_follows_what_they_carry(tmp_path) -> None:
    """By name, a built feature model, a timm model itself, the transform the
    torchvision and transformers adapters record, and a transformers processor."""
    import timm
    import torchvision
    from transformers import AutoConfig, AutoModel, ViTImageProcessor

    from unifeat._feature_model import attach_image_transform

    by_name = data_config("timm:convnext_atto")
    built = unifeat.create_model("timm:convnext_atto", features_only=True)
    assert data_config(built) == by_name == data_config(timm.create_model("convnext_atto"))
    tv_model = unifeat.create_model("tv:resnet50", features_only=True)
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    attach_image_transform(tv_model, weights.transforms())
    assert data_config(tv_model).crop_pct == pytest.approx(224 / 232)
    config = AutoConfig.for_model(
        "vit",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=48,
        patch_size=16,
    )
    AutoModel.from_config(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(tmp_path / "vit")
    hf = unifeat.create_model(f"hf:{tmp_path / 'vit'}", pretrained=True, features_only=True)
    assert data_config(hf).size == (48, 48) and data_config(hf).impl == "transformers"
    # A feature model's own data_config attribute wins (the adapters' contract).
    carried = DataConfig(input_size=(3, 32, 32), source="test")
    object.__setattr__(tv_model, "data_config", carried)
    assert data_config(tv_model) is carried


def test_training_transform_is_a_random_resized_crop_with_flips() -> None:
    config = data_config("timm:resnet18")
    train = create_transform(config, training=True)
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1))
    image = Image.fromarray(np.stack([gradient] * 3, axis=-1))
    torch.manual_seed(0)
    outputs = [train(image) for _ in range(200)]
    assert all(o.shape == (3, 224, 224) for o in outputs)
    # Left-to-right gradient: flipped crops run right-to-left, about half of them.
    flipped = sum(float(o[0, :, 0].mean()) > float(o[0, :, -1].mean()) for o in outputs)
    assert 60 < flipped < 140
    # Crops of different sizes: the spread of the visible gradient varies.
    spans = [float(o[0, 0, -1] - o[0, 0, 0]) for o in outputs]
    assert np.std(np.abs(spans)) > 0.1
    # Normalized with the config's mean and std: 0 maps to -mean/std.
    low = min(float(o[0].min()) for o in outputs)
    assert low == pytest.approx(-config.mean[0] / config.std[0], abs=0.05)


def test_bgr_configs_flip_channels() -> None:
    rgb = DataConfig(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
    bgr = rgb.model_copy(update={"channel_order": "BGR"})
    image = Image.new("RGB", (40, 40), (255, 0, 0))
    assert torch.equal(create_transform(bgr)(image), create_transform(rgb)(image).flip(0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": (3, 0, 224)}, "all sides >= 1"),
        ({"input_size": (3, 224, 224), "mean": (0.5, 0.5)}, "one value per channel"),
        ({"input_size": (3, 224, 224), "std": (0.5, 0.0, 0.5)}, "std must be positive"),
        ({"input_size": (3, 224, 224), "crop_pct": 0}, "greater than 0"),
        ({"input_size": (3, 224, 224), "interpolation": "cubic"}, "bicubic"),
        ({"input_size": (3, 224, 224), "resize": 256}, "Extra inputs"),
    ],
)
def test_invalid_configs_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_config_is_frozen_and_round_trips_through_json() -> None:
    config = data_config("timm:vit_tiny_patch16_224")
    with pytest.raises(ValueError):
        config.crop_pct = 1.0  # type: ignore[misc]
    assert DataConfig.model_validate_json(config.model_dump_json()) == config


def test_bad_arguments_are_unifeat_errors() -> None:
    with pytest.raises(unifeat.UnsupportedOptionError, match=r"model name or a torch\.nn\.Module"):
        data_config(42)  # type: ignore[arg-type]
    with pytest.raises(unifeat.UnsupportedOptionError, match="only apply when a model is given"):
        data_config(torch.nn.Conv2d(3, 3, 1), pretrained=True)
    with pytest.raises(unifeat.UnknownModelError):
        data_config("resnet5O")


def test_fractional_crop_fractions_resize_to_whole_pixels() -> None:
    """224 / (224 / 232) is 232, not 231: torchvision's recipe survives the round trip."""
    from unifeat._data import resize_size

    config = DataConfig(input_size=(3, 224, 224), crop_pct=224 / 232)
    assert resize_size(config, 500, 500) == (232, 232)
    assert math.floor(224 / (224 / 232)) == 232
