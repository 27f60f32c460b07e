"""Which files ``photoenhance enhance`` sends and where each result goes.

Folders are walked recursively (``--no-recursive``: the top level only) and mirrored under
``--out``: ``FOLDER/sub/x.jpg`` -> ``OUT/sub/x.jpg``. Hidden files and folders (``.DS_Store``,
AppleDouble ``._x.jpg``) and files without an image extension are skipped and counted.
Symlinked folders are not followed (a link may lead out of the tree, or in a circle); a
symlinked file is sent, as the user put it there.

An output's name depends only on its own input and the output format, never on which other
files are there, so ``--skip-existing`` finds it again when files are added or removed: an
output keeps its input's name when the format is the input's (``x.jpg`` -> ``x.jpg``), and
appends the new extension when it changes (``x.heic`` -> ``x.heic.jpg``, ``x.bmp`` ->
``x.bmp.png``), so ``x.jpg`` and ``x.png`` side by side never compete for one name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif",
})
# The output formats, their extension and the input suffixes that already name them.
FORMAT_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "avif": "avif"}
_SAME = {"png": {".png"}, "jpeg": {".jpg", ".jpeg"}, "webp": {".webp"}, "avif": {".avif"}}


@dataclass
class Plan:
    """The inputs to send, each with its output path relative to ``--out`` (no extension
    decided yet), and what was left out."""

    inputs: list[tuple[Path, PurePath]] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)  # symlinked folders, not followed


def _walk(root: Path, recursive: bool, plan: Plan,
          exclude: Path | None) -> Iterable[tuple[Path, PurePath]]:
    for folder, dirs, files in os.walk(root):  # followlinks=False: links are not entered
        base = Path(folder)
        kept = []
        for d in sorted(dirs):
            if d.startswith(".") or exclude is not None and (base / d).resolve() == exclude:
                continue  # hidden, or --out inside the folder: results are not inputs
            if (base / d).is_symlink():
                plan.links.append(base / d)
            elif recursive:
                kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            path = base / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                plan.not_images.append(path)
            elif path.is_file():  # a dangling link is not a file
                yield path, path.relative_to(root)


def plan(paths: Iterable[Path], recursive: bool = True, exclude: Path | None = None) -> Plan:
    """Files as given (whatever their extension); folders walked. Each output path is its
    input's path under its folder argument (a file given alone: its name); where two
    arguments give the same one, the later is ``x-2.jpg`` (argument order decides)."""
    out = Plan()
    claimed: set[str] = set()
    seen: set[Path] = set()
    for arg in paths:
        found = (_walk(arg, recursive, out, exclude and exclude.resolve()) if arg.is_dir()
                 else [(arg, PurePath(arg.name))])
        for path, rel in found:
            if path.resolve() in seen:
                continue  # the same file named twice is sent once
            seen.add(path.resolve())
            candidate, n = rel, 1
            while str(candidate).casefold() in claimed:
                n += 1
                candidate = rel.with_name(f"{rel.stem}-{n}{rel.suffix}")
            claimed.add(str(candidate).casefold())
            out.inputs.append((path, candidate))
    return out


def output_path(rel: PurePath, fmt: str, taken: set[str]) -> PurePath:
    """Where ``rel``'s output in format ``fmt`` goes: its own name when ``fmt`` is its
    format, else the name plus the format's extension; ``taken`` (casefolded relative paths
    of the inputs) bumps a converted name that another input's own name holds
    (``a.bmp`` beside ``a.bmp.png``: ``a.bmp-2.png``)."""
    if rel.suffix.lower() in _SAME.get(fmt, ()):
        return rel
    ext = FORMAT_EXTENSIONS.get(fmt, fmt)
    candidate, n = rel.with_name(f"{rel.name}.{ext}"), 1
    while str(candidate).casefold() in taken:
        n += 1
        candidate = rel.with_name(f"{rel.name}-{n}.{ext}")
    return candidate
