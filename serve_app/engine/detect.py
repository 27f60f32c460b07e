"""Batched face detection (RetinaFace) and alignment, equal to facexlib's one-image path.

Images of the same size share one forward. Different sizes are not padded to a shared
shape: padding changes the detector's features near the right and bottom borders, so the
faces found there would differ from upstream's. Decoding is done here, not with
``RetinaFace.detect_faces``, which keeps per-call values on the (shared) module.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import nn

import serve_app.engine.compat  # noqa: F401
from serve_app.engine.chunks import Lanes, by_group, chunk_size, detect_bytes, forward_chunks

FACE_TEMPLATE = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]]
)
_MEAN = (104.0, 117.0, 123.0)
EYE_DIST_THRESHOLD = 5  # GFPGANer's: skip side faces and faces with eyes < 5 px apart


@functools.lru_cache(maxsize=64)
def _priors(cfg_name: str, h: int, w: int) -> torch.Tensor:
    from facexlib.detection.retinaface import generate_config
    from facexlib.detection.retinaface_utils import PriorBox

    name = "resnet50" if cfg_name == "Resnet50" else "mobile0.25"
    return PriorBox(generate_config(name), image_size=(h, w)).forward()


def _decode(net: nn.Module, loc, conf, landms, h: int, w: int, threshold: float) -> np.ndarray:
    from facexlib.detection.retinaface_utils import decode, decode_landm, py_cpu_nms

    var = net.cfg["variance"]
    priors = _priors(net.cfg["name"], h, w).to(loc.device)
    scale = torch.tensor([w, h] * 2, dtype=torch.float32, device=loc.device)
    scale1 = torch.tensor([w, h] * 5, dtype=torch.float32, device=loc.device)
    boxes = (decode(loc, priors, var) * scale).cpu().numpy()
    scores = conf[:, 1].cpu().numpy()
    marks = (decode_landm(landms, priors, var) * scale1).cpu().numpy()
    inds = np.where(scores > threshold)[0]
    boxes, marks, scores = boxes[inds], marks[inds], scores[inds]
    order = scores.argsort()[::-1]
    boxes, marks, scores = boxes[order], marks[order], scores[order]
    dets = np.hstack((boxes, scores[:, np.newaxis])).astype(np.float32, copy=False)
    keep = py_cpu_nms(dets, 0.4)
    return np.concatenate((dets[keep, :], marks[keep]), axis=1)


def detect(
    net: nn.Module, images: Sequence[np.ndarray], threshold: float, budget_mb: int,
    lanes: Lanes | None = None,
) -> list[np.ndarray]:
    """Per image, an (n, 15) array: box (4), score, 5 landmarks (x, y), as facexlib's."""
    device = next(net.parameters()).device
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        by_shape[img.shape[:2]].append(i)
    out: list[np.ndarray] = [np.zeros((0, 15), np.float32)] * len(images)
    mean = torch.tensor(_MEAN, device=device).view(1, 3, 1, 1)

    def fwd(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return net(x.to(device).float() - mean)

    def shape(group: tuple[tuple[int, int], list[int]], lanes: Lanes | None) -> None:
        (h, w), idx = group
        tensors = [torch.from_numpy(images[i]).permute(2, 0, 1) for i in idx]
        chunk = chunk_size(budget_mb, detect_bytes(h, w, 4))
        for start, (loc, conf, landms) in forward_chunks(fwd, tensors, chunk, lanes):
            for k in range(loc.shape[0]):
                out[idx[start + k]] = _decode(net, loc[k], conf[k], landms[k], h, w, threshold)

    by_group(shape, list(by_shape.items()), lanes)
    return out


def select(dets: np.ndarray, h: int, w: int,
           only_center_face: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(5-point landmarks, box x0 y0 x1 y1) of the faces GFPGANer keeps (eye-distance
    filter, optional centre face)."""
    from facexlib.utils.face_restoration_helper import get_center_face

    marks, boxes = [], []
    for bbox in dets:
        eye_dist = np.linalg.norm([bbox[5] - bbox[7], bbox[6] - bbox[8]])
        if eye_dist < EYE_DIST_THRESHOLD:
            continue
        marks.append(np.array([[bbox[i], bbox[i + 1]] for i in range(5, 15, 2)]))
        boxes.append(bbox[0:5])
    if only_center_face and boxes:
        _, center = get_center_face(boxes, h, w)
        marks, boxes = [marks[center]], [boxes[center]]
    return [(m, b[:4]) for m, b in zip(marks, boxes, strict=True)]


def align(img: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(512x512 crop, affine matrix) as FaceRestoreHelper.align_warp_face makes them."""
    # LMEDS matches skimage's similarity transform (facexlib's choice).
    affine = cv2.estimateAffinePartial2D(landmarks, FACE_TEMPLATE, method=cv2.LMEDS)[0]
    crop = cv2.warpAffine(img, affine, (512, 512), borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(135, 133, 132))
    return crop, affine
