"""Models and inputs of ``quantize.py``: BERT-base, NudeNet's detector, a ResNet-style CNN.

Realistic image inputs come from the two photographs scikit-learn ships
(``sklearn/datasets/images/{china,flower}.jpg``): random crops (a quarter to all of the image's
area, aspect 3:4 to 4:3, mirrored half of the time) resized to the model's input size. Nothing is
downloaded; decoding the JPEGs needs Pillow or OpenCV (the benchmark environment has OpenCV).

The ResNet-style CNN (ResNet-18 layout at 128x128, 1000 classes) is built with ``onnx.helper``.
Its weights are random but initialized from data, as LSUV does: each convolution's output is
measured on image crops and normalized (then scaled by a BatchNorm-like gamma and shifted by a
beta) and the normalization is folded into the convolution's weights and bias, as exporters
fold BatchNormalization. Activations thus have the statistics of a trained network's (unit-scale
channels, ReLU sparsity, residual growth) instead of exploding or vanishing. The classifier head
is trained (softmax regression) on the features of 128 other crops grouped by k-means into 4
classes, so that, as in a trained network, most inputs lie far from a decision boundary: on
held-out crops the gap between the two largest logits has median 9 and 5th percentile 1.1
(logits up to ~17). A random head would put most inputs next to a boundary (the top two of
1000 random logits are close) and make top-1 agreement measure ties, not quantization.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "BERT_VOCAB",
    "bert_feeds",
    "build_resnet",
    "image_crops",
    "nudenet_feeds",
    "resnet_feeds",
    "sample_images",
]

BERT_VOCAB = 30522
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def bert_feeds(count: int, *, seq: int = 128, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """BERT inputs: ``[CLS] tokens... [SEP]`` with ids drawn from the vocabulary, full attention."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        ids = rng.integers(1000, BERT_VOCAB, size=(1, seq))
        ids[0, 0], ids[0, -1] = 101, 102
        types = np.zeros((1, seq), np.int64)
        types[0, seq // 2:] = 1  # a sentence pair
        feeds.append({"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, seq), np.int64),
                      "token_type_ids": types})
    return feeds


def sample_images() -> list[np.ndarray]:
    """scikit-learn's sample photographs as HxWx3 uint8 RGB arrays."""
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    paths = [os.path.join(folder, name) for name in ("china.jpg", "flower.jpg")]
    try:
        from PIL import Image

        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    except ImportError:
        pass
    try:
        import cv2
    except ImportError:
        raise SystemExit("decoding scikit-learn's sample JPEGs needs Pillow or OpenCV: pip install pillow") from None
    return [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of an HxWxC float image to size x size."""
    h, w = image.shape[:2]
    ys = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    xs = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def image_crops(count: int, size: int, *, seed: int, normalize: bool = True) -> np.ndarray:
    """``count`` random crops as a float32 ``[count, 3, size, size]`` array.

    ``normalize``: ImageNet mean/std normalization; otherwise values in [0, 1].
    """
    rng = np.random.default_rng(seed)
    images = sample_images()
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        area = rng.uniform(0.25, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = _resize(img[y:y + ch, x:x + cw].astype(np.float32) / 255.0, size)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if normalize:
            crop = (crop - _MEAN) / _STD
        out[i] = crop.transpose(2, 0, 1)
    return out


def nudenet_feeds(count: int, *, seed: int) -> list[dict[str, np.ndarray]]:
    """NudeNet 320n inputs: RGB crops in [0, 1], 1x3x320x320."""
    crops = image_crops(count, 320, seed=seed, normalize=False)
    return [{"images": crops[i:i + 1]} for i in range(count)]


# -- ResNet-style CNN ----------------------------------------------------------------------------------
class _ConvRunner:
    """Runs single Conv nodes in onnxruntime (to initialize the network from data)."""

    def __init__(self) -> None:
        import onnxruntime as ort

        self._ort = ort

    def __call__(self, x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
        node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride, stride], pads=[pad] * 4)
        graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  initializer=[numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = self._ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]


def _maxpool(x: np.ndarray) -> np.ndarray:
    """3x3 stride-2 max pooling with padding 1 (numpy)."""
    n, c, h, w = x.shape
    padded = np.full((n, c, h + 2, w + 2), -np.inf, np.float32)
    padded[:, :, 1:-1, 1:-1] = x
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = np.full((n, c, oh, ow), -np.inf, np.float32)
    for dy in range(3):
        for dx in range(3):
            out = np.maximum(out, padded[:, :, dy:dy + 2 * oh:2, dx:dx + 2 * ow:2])
    return out


def build_resnet(path: str, *, size: int = 128, classes: int = 1000, init_images: int = 16,
                 seed: int = 0) -> str:
    """Write a ResNet-18-style classifier (Conv+bias, Relu, Add, pooling, Gemm) to ``path``."""
    rng = np.random.default_rng(seed)
    conv = _ConvRunner()
    x = image_crops(init_images, size, seed=10_000 + seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = [0]

    def conv_layer(inp: str, act: np.ndarray, cin: int, cout: int, k: int, stride: int,
                   gamma_range: tuple[float, float]) -> tuple[str, np.ndarray]:
        counter[0] += 1
        name = f"conv{counter[0]}"
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        y = conv(act, w, stride, k // 2)
        mean = y.mean(axis=(0, 2, 3))
        std = y.std(axis=(0, 2, 3)) + 1e-5
        gamma = rng.uniform(*gamma_range, size=cout).astype(np.float32)
        beta = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        scale = gamma / std
        w_folded = (w * scale[:, None, None, None]).astype(np.float32)
        b_folded = (beta - mean * scale).astype(np.float32)
        inits.extend([numpy_helper.from_array(w_folded, f"{name}.w"), numpy_helper.from_array(b_folded, f"{name}.b")])
        nodes.append(helper.make_node("Conv", [inp, f"{name}.w", f"{name}.b"], [name], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        out = (y - mean[None, :, None, None]) * scale[None, :, None, None] + beta[None, :, None, None]
        return name, out.astype(np.float32)

    def relu(inp: str, act: np.ndarray) -> tuple[str, np.ndarray]:
        nodes.append(helper.make_node("Relu", [inp], [inp + ".relu"]))
        return inp + ".relu", np.maximum(act, 0)

    name, act = relu(*conv_layer("input", x, 3, 64, 7, 2, (0.8, 1.2)))
    nodes.append(helper.make_node("MaxPool", [name], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    name, act = "pool", _maxpool(act)
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            h, a = relu(*conv_layer(name, act, cin, cout, 3, stride, (0.8, 1.2)))
            h, a = conv_layer(h, a, cout, cout, 3, 1, (0.2, 0.6))  # residual branch: small gamma
            if stride != 1 or cin != cout:
                skip, s_act = conv_layer(name, act, cin, cout, 1, stride, (0.8, 1.2))
            else:
                skip, s_act = name, act
            added = f"add{stage}_{block}"
            nodes.append(helper.make_node("Add", [h, skip], [added]))
            name, act = relu(added, a + s_act)
            cin = cout
    nodes.append(helper.make_node("GlobalAveragePool", [name], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"]))
    fc, fc_bias = _trained_head(nodes, inits, cin, classes, size, rng, seed)
    inits += [numpy_helper.from_array(fc, "fc.w"), numpy_helper.from_array(fc_bias, "fc.b")]
    nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "resnet18_style",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    tmp = path + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, path)
    return path


def _trained_head(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], width: int, classes: int,
                  size: int, rng: np.random.Generator, seed: int, crops: int = 128, clusters: int = 4
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A classifier head trained on image features, so that its decisions have real margins.

    A random head over 1000 classes puts most inputs next to a decision boundary (the top two
    of 1000 random logits are close), which no trained network does. Instead: the features of
    ``crops`` image crops are grouped by k-means into ``clusters`` groups, each group gets a
    class, and a softmax regression (with weight decay) learns them; the other classes keep small
    random weights.
    """
    import onnxruntime as ort

    graph = helper.make_graph(nodes, "body", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, size, size])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)], initializer=inits)
    body = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(body.SerializeToString(), so, providers=["CPUExecutionProvider"])
    images = image_crops(crops, size, seed=20_000 + seed)
    feats = np.concatenate([session.run(None, {"input": images[i:i + 16]})[0] for i in range(0, crops, 16)])
    mean, std = feats.mean(axis=0), feats.std(axis=0) + 1e-6
    z = (feats - mean) / std
    centers = z[rng.choice(crops, clusters, replace=False)]
    for _ in range(50):  # k-means
        labels = np.argmin(((z[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
        centers = np.stack([z[labels == k].mean(0) if np.any(labels == k) else centers[k] for k in range(clusters)])
    class_of = rng.choice(classes, clusters, replace=False)
    target = class_of[labels]
    w = (rng.standard_normal((classes, width)) * 0.01).astype(np.float64)
    b = np.zeros(classes)
    onehot = np.eye(classes)[target]
    for _ in range(300):  # softmax regression, full batch
        logits = z @ w.T + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / crops
        w -= 0.5 * (grad.T @ z + 1e-3 * w)
        b -= 0.5 * grad.sum(0)
    # Fold the feature standardization into the head: logits = ((f - mean) / std) @ w.T + b.
    fc = (w / std[None, :]).astype(np.float32)
    bias = (b - (w / std[None, :]) @ mean).astype(np.float32)
    return fc, bias


def resnet_feeds(count: int, *, size: int = 128, seed: int) -> list[dict[str, Any]]:
    """ResNet inputs: normalized crops, 1x3xSxS."""
    crops = image_crops(count, size, seed=seed)
    return [{"input": crops[i:i + 1]} for i in range(count)]

