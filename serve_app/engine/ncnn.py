"""ncnn model pairs (``.param`` + ``.bin``, as Upscayl and realesrgan-ncnn-vulkan share them)
converted to PyTorch state dicts of a known architecture, checking every shape.

Recognised graphs: RRDBNet (Real-ESRGAN x4plus and its relatives: 15 convolutions per block
plus 6, two nearest x2 upsamplings) and SRVGGNetCompact with PReLU (realesr-animevideov3).
Anything else is refused with what did not match. The ``.bin`` layout is ncnn's ModelBin:
per Convolution a 4-byte tag (0x01306B47: fp16 follows, 0: fp32 follows) and the weights
(padded to 4 bytes), then the bias as raw fp32; per PReLU its slopes as raw fp32. The file
must be consumed exactly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

MAGIC = "7767517"
TAG_FP16 = 0x01306B47
LEAKY = 2  # ncnn's activation_type for LeakyReLU, fused into a Convolution


class NcnnError(ValueError):
    """The pair is not a graph this converter knows, or its data does not fit it."""


@dataclass
class Layer:
    type: str
    name: str
    params: dict[int, str] = field(default_factory=dict)

    def int(self, key: int, default: int = 0) -> int:
        return int(self.params.get(key, default))

    def float(self, key: int, default: float = 0.0) -> float:
        return float(self.params.get(key, default))


def parse_param(text: str) -> list[Layer]:
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != [MAGIC]:
        raise NcnnError("not an ncnn .param file (magic 7767517 missing)")
    try:
        n_layers = int(lines[1][0])
    except (IndexError, ValueError):
        raise NcnnError("malformed .param header") from None
    layers = []
    for parts in lines[2:]:
        try:
            kind, name, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
        except (IndexError, ValueError):
            raise NcnnError(f"malformed layer line: {' '.join(parts)[:80]}") from None
        params = {}
        for tok in parts[4 + n_in + n_out:]:
            key, _, value = tok.partition("=")
            try:
                params[int(key)] = value
            except ValueError:
                raise NcnnError(f"{name}: malformed parameter {tok[:40]}") from None
        layers.append(Layer(kind, name, params))
    if len(layers) != n_layers:
        raise NcnnError(f".param declares {n_layers} layers but lists {len(layers)}")
    return layers


class _Bin:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NcnnError(".bin ends before the weights the .param describes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def tagged(self, count: int) -> np.ndarray:
        (tag,) = struct.unpack("<I", self.take(4))
        if tag == TAG_FP16:
            raw = self.take((count * 2 + 3) // 4 * 4)
            return np.frombuffer(raw[: count * 2], "<f2").astype(np.float32)
        if tag == 0:
            return np.frombuffer(self.take(count * 4), "<f4").copy()
        raise NcnnError(f"weights stored with tag {tag:#010x} (int8 or quantised): not supported")

    def raw(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(count * 4), "<f4").copy()


@dataclass
class _Conv:
    layer: Layer
    weight: np.ndarray  # flat
    bias: np.ndarray | None

    @property
    def out(self) -> int:
        return self.layer.int(0)

    @property
    def kernel(self) -> int:
        return self.layer.int(1)

    @property
    def cin(self) -> int:
        return self.weight.size // (self.out * self.kernel * self.kernel)


def _read_weights(layers: list[Layer], data: bytes) -> tuple[list[_Conv], list[np.ndarray]]:
    b = _Bin(data)
    convs, slopes = [], []
    for layer in layers:
        if layer.type == "Convolution":
            if layer.int(1) != layer.int(11, layer.int(1)) or layer.int(3, 1) != 1 \
                    or layer.int(2, 1) != 1 or layer.int(4) != (layer.int(1) - 1) // 2:
                raise NcnnError(f"{layer.name}: not a square, stride-1, same-padded convolution")
            w = b.tagged(layer.int(6))
            bias = b.raw(layer.int(0)) if layer.int(5) else None
            if w.size % (layer.int(0) * layer.int(1) ** 2):
                raise NcnnError(f"{layer.name}: {w.size} weights do not fit {layer.int(0)} outputs")
            convs.append(_Conv(layer, w, bias))
        elif layer.type == "PReLU":
            slopes.append(b.raw(layer.int(0)))
        elif layer.type not in _WEIGHTLESS:
            raise NcnnError(f"layer type {layer.type} ({layer.name}) is not part of a known graph")
    if b.pos != len(data):
        raise NcnnError(f".bin holds {len(data) - b.pos} bytes more than the .param describes")
    return convs, slopes


_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle",
               "Crop", "Reshape", "Permute"}


def _count(layers: list[Layer], kind: str) -> int:
    return sum(1 for layer in layers if layer.type == kind)


def _put(state: dict, key: str, conv: _Conv, shape: tuple[int, ...], act: int) -> None:
    import torch

    name = conv.layer.name
    if conv.weight.size != int(np.prod(shape)) or conv.out != shape[0] or conv.kernel != shape[2]:
        raise NcnnError(f"{name} -> {key}: {conv.out}x{conv.cin}x{conv.kernel}x{conv.kernel} "
                        f"does not match {'x'.join(map(str, shape))}")
    if conv.bias is None:
        raise NcnnError(f"{name} -> {key}: no bias")
    if conv.layer.int(9) != act or (act == LEAKY and not _slope_02(conv.layer)):
        raise NcnnError(f"{name} -> {key}: activation {conv.layer.int(9)} where {act} belongs")
    state[f"{key}.weight"] = torch.from_numpy(conv.weight.reshape(shape))
    state[f"{key}.bias"] = torch.from_numpy(conv.bias)


def _slope_02(layer: Layer) -> bool:
    vals = layer.params.get(-23310, "").split(",")
    return len(vals) == 2 and abs(float(vals[1]) - 0.2) < 1e-6


def _rrdbnet(layers: list[Layer], convs: list[_Conv]) -> tuple[dict, dict]:
    n = len(convs)
    if n < 21 or (n - 6) % 15:
        raise NcnnError(f"{n} convolutions: not RRDBNet's 15 per block plus 6")
    interps = [lay for lay in layers if lay.type == "Interp"]
    if len(interps) != 2 or any(i.int(0) != 1 or i.float(1) != 2 or i.float(2) != 2
                                for i in interps):
        raise NcnnError("RRDBNet needs exactly two nearest x2 upsamplings")
    blocks, nf, gc = (n - 6) // 15, convs[0].out, convs[1].out
    cin = convs[0].cin
    scale = {3: 4, 12: 2, 48: 1}.get(cin)
    if scale is None:
        raise NcnnError(f"first convolution takes {cin} channels: not 3, 12 or 48")
    if scale != 4 and _count(layers, "Reshape") == 0:
        raise NcnnError("an RRDBNet x2/x1 graph needs its pixel-unshuffle (Reshape) layers")
    plan: list[tuple[str, tuple[int, ...], int]] = [("conv_first", (nf, cin, 3, 3), 0)]
    for b in range(blocks):
        for r in (1, 2, 3):
            for c in range(1, 6):
                shape = (nf if c == 5 else gc, nf + (c - 1) * gc, 3, 3)
                plan.append((f"body.{b}.rdb{r}.conv{c}", shape, 0 if c == 5 else LEAKY))
    plan += [("conv_body", (nf, nf, 3, 3), 0), ("conv_up1", (nf, nf, 3, 3), LEAKY),
             ("conv_up2", (nf, nf, 3, 3), LEAKY), ("conv_hr", (nf, nf, 3, 3), LEAKY),
             ("conv_last", (3, nf, 3, 3), 0)]
    state: dict = {}
    for conv, (key, shape, act) in zip(convs, plan, strict=True):
        _put(state, key, conv, shape, act)
    facts = {"arch": "RRDBNet", "num_feat": nf, "num_block": blocks, "num_grow_ch": gc,
             "scale": scale}
    return state, facts


def _srvgg(layers: list[Layer], convs: list[_Conv], slopes: list[np.ndarray]) -> tuple[dict, dict]:
    import torch

    shuffles = [lay for lay in layers if lay.type == "PixelShuffle"]
    if len(shuffles) != 1 or len(slopes) != len(convs) - 1 or len(convs) < 2:
        raise NcnnError("not SRVGGNetCompact: one PixelShuffle and a PReLU after every "
                        "convolution but the last")
    scale, nf = shuffles[0].int(0), convs[0].out
    interps = [lay for lay in layers if lay.type == "Interp"]
    if not interps or interps[0].int(0) != 1 or interps[0].float(1) != scale:
        raise NcnnError(f"not SRVGGNetCompact: no nearest x{scale} upsampling of the input")
    if convs[0].cin != 3:
        raise NcnnError(f"first convolution takes {convs[0].cin} channels, not 3")
    state: dict = {}
    body = 0
    for i, conv in enumerate(convs):
        last = i == len(convs) - 1
        shape = (3 * scale * scale, nf, 3, 3) if last else (nf, 3 if i == 0 else nf, 3, 3)
        _put(state, f"body.{body}", conv, shape, 0)
        body += 1
        if not last:
            if slopes[i].size != nf:
                raise NcnnError(f"PReLU after {conv.layer.name}: {slopes[i].size} slopes, not {nf}")
            state[f"body.{body}.weight"] = torch.from_numpy(slopes[i])
            body += 1
    facts = {"arch": "SRVGGNetCompact", "num_feat": nf, "num_conv": len(convs) - 2,
             "scale": scale, "act_type": "prelu"}
    # realesr-animevideov3-x2/x3 are the x4 network plus a final resize in the graph; the
    # network is converted, and the server resizes to the requested scale (Lanczos).
    if len(interps) > 1:
        facts["graph_resize_dropped"] = [i.float(1) for i in interps[1:]]
    return state, facts


def convert(param_text: str, bin_data: bytes) -> tuple[dict, dict]:
    """``(state_dict, facts)``: the pair as a PyTorch state dict with upstream's key names
    (basicsr's RRDBNet or Real-ESRGAN's SRVGGNetCompact)."""
    layers = parse_param(param_text)
    convs, slopes = _read_weights(layers, bin_data)
    if not convs:
        raise NcnnError("no convolutions: not a known graph")
    if slopes:
        return _srvgg(layers, convs, slopes)
    return _rrdbnet(layers, convs)
