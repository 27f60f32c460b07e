"""Synthetic weights: random-initialised state dicts written with the official names and
keys (``synth``), and a detector that finds a known, small number of faces.

A randomly initialised RetinaFace reports hundreds of faces on any photo, so the synthetic
detector is built by hand instead (see ``sparse_detector``):

* every backbone (ResNet-50) and FPN convolution is zero, so the FPN output is a constant
  map (channel 0 = 1 from a batch-norm bias) whatever the image;
* the stride-32 SSH 3x3 convolution copies that constant from one neighbour per output
  channel (above, left, below, right). With zero padding, channel "above" is 0 on the top
  row only, "left" is 0 on the left column only, and so on: the borders become visible;
* the stride-32 class head scores anchor 0 high only where "above" and "left" are both 0
  (the top-left cell) and anchor 1 only where "below" and "right" are 0 (the bottom-right
  cell); the other two levels score every anchor low through their biases;
* box and landmark heads are zero with biases that place a 128 px face, landmarks on the
  FFHQ 5-point template, 96 px inwards from each of those corner anchors.

So any image gets exactly two candidate faces (one near each of two opposite corners),
merged into one by NMS when the image is small enough for them to overlap. The output does
not depend on the pixels, which makes face counts deterministic in tests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from serve_app.engine import weights
from serve_app.engine.models import construct
from serve_app.engine.weights import LoadedWeightsInfo, Profile, WeightSpec

LOGGER = logging.getLogger(__name__)

FACE_PX = 128.0  # box side of a synthetic face
INSET_PX = 96.0  # box centre, inwards from the corner anchor's centre
LOGIT = 20.0  # class-1 logit scale: softmax(+10) = 0.99995 passes 0.97, softmax(-10) fails
# FFHQ 5-point template of a 512 crop (facexlib's FaceRestoreHelper)
TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]]
)
_VARIANCE = (0.1, 0.2)
_L3_SIZES = (256.0, 512.0)  # stride-32 anchor sizes (min_sizes of the last level)


def synth(dir: Path, profile: Profile = "tiny", *, seed: int = 0) -> LoadedWeightsInfo:
    """Write random-initialised weights with the official names and keys, plus a marker."""
    dir = Path(dir).expanduser()
    dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    files = {}
    for s in weights.REGISTRY.values():
        state = state_dict(s, profile)
        payload = {s.key: state} if s.key else state
        dest = dir / s.filename
        fd, tmp = tempfile.mkstemp(prefix=f".{s.filename}.", dir=dir)
        os.close(fd)
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        files[s.name] = dest
    (dir / weights.MARKER).write_text(json.dumps({"synthetic": True, "profile": profile, "seed": seed}))
    LOGGER.info("wrote synthetic %s weights to %s", profile, dir)
    return LoadedWeightsInfo(dir=dir, synthetic=True, profile=profile, files=files)


def state_dict(s: WeightSpec, profile: Profile) -> dict[str, torch.Tensor]:
    net = construct(s, profile)
    if s.arch == "RetinaFace":
        sparse_detector(net)
    elif s.arch == "ParseNet":
        _tame_batchnorm(net)
    elif s.arch == "RRDBNet":
        _calibrate_output(net, net.conv_last)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def _tame_batchnorm(net: nn.Module) -> None:
    # Random convs through ten residual blocks grow activations; small BN gains keep the
    # parsing logits finite so the argmax (the mask) is well defined.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def _calibrate_output(net: nn.Module, last: nn.Conv2d) -> None:
    # A random RRDBNet outputs values near 0, which clamps to a black image and would make
    # equivalence tests trivially pass. Rescale its last (linear) conv so outputs centre on
    # 0.5 with a spread of 0.2: image-like values that still depend on the input.
    y = torch.linspace(0, 1, 32)
    probe = torch.stack([y[:, None] * y[None, :], y[:, None].expand(32, 32), y[None, :].expand(32, 32)])
    out = net(probe[None])
    k = 0.2 / max(float(out.std()), 1e-6)
    last.weight.mul_(k)
    last.bias.mul_(k).add_(0.5 - k * float(out.mean()))


@torch.no_grad()
def sparse_detector(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
    # constant 1 on channel 0 of every FPN output (conv is zero; BN bias survives ReLU)
    for layer in (net.fpn.output1, net.fpn.output2, net.fpn.output3, net.fpn.merge1, net.fpn.merge2):
        layer[1].bias[0] = 1.0
    # stride-32 SSH: channels 0..3 copy the neighbour above, left, below, right
    conv = net.ssh3.conv3X3[0].weight
    for ch, (ky, kx) in enumerate(((0, 1), (1, 0), (2, 1), (1, 2))):
        conv[ch, 0, ky, kx] = 1.0
    # class heads: levels 1, 2 always low; level 3 anchor 0 top-left, anchor 1 bottom-right
    for level in (0, 1):
        head = net.ClassHead[level].conv1x1
        head.bias[1::2] = -LOGIT
    head = net.ClassHead[2].conv1x1
    head.weight[1, 0:2, 0, 0] = -LOGIT
    head.bias[1] = 0.5 * LOGIT
    head.weight[3, 2:4, 0, 0] = -LOGIT
    # a slightly lower score than the top-left face: a strict order, so no ties to break
    head.bias[3] = 0.45 * LOGIT
    # boxes and landmarks of the two level-3 anchors
    box = net.BboxHead[2].conv1x1.bias
    ldm = net.LandmarkHead[2].conv1x1.bias
    for anchor, sign in ((0, 1.0), (1, -1.0)):
        prior = _L3_SIZES[anchor]
        shift = sign * INSET_PX / (_VARIANCE[0] * prior)
        size = math.log(FACE_PX / prior) / _VARIANCE[1]
        box[anchor * 4 : anchor * 4 + 4] = torch.tensor([shift, shift, size, size])
        pts = (TEMPLATE_512 - 256.0) * (FACE_PX / 512.0) + sign * INSET_PX
        ldm[anchor * 10 : anchor * 10 + 10] = torch.from_numpy(
            (pts / (_VARIANCE[0] * prior)).reshape(-1)
        ).float()
