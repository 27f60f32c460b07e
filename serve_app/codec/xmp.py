"""XMP made true for the output, in one pass over its tags (linear in its length).

``prepare_xmp`` sets orientation, size and resolution, drops thumbnails (and, ``keep-no-gps``,
places) and adds an IPTC caption as ``dc:description``; ``edit_xmp`` is the single pass.
A regex over the whole packet was quadratic on unclosed elements (docs/SECURITY.md,
"Metadata"); this editor finds each tag once.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping
from xml.sax.saxutils import escape as xml_escape

LOGGER = logging.getLogger(__name__)


def prepare_xmp(
    raw: bytes | None, no_gps: bool, width: int, height: int,
    dpi: tuple[float, float] | None = None, ratio: tuple[float, float] | None = None,
    caption: str | None = None,
) -> bytes | None:
    if not raw and not caption:
        return None
    values: dict[str, str | Callable[[str], str]] = {
        "tiff:Orientation": "1",
        "exif:PixelXDimension": str(width),
        "exif:PixelYDimension": str(height),
        "tiff:ImageWidth": str(width),
        "tiff:ImageLength": str(height),
    }
    if dpi is not None:  # the same as EXIF's, in inches
        values["tiff:XResolution"], values["tiff:YResolution"] = _rational(dpi[0]), _rational(dpi[1])
        values["tiff:ResolutionUnit"] = "2"
    elif ratio is not None:  # XMP's own resolution, in its own unit, scaled with the image
        values["tiff:XResolution"] = functools.partial(_scaled_rational, factor=ratio[0])
        values["tiff:YResolution"] = functools.partial(_scaled_rational, factor=ratio[1])
    if not raw:
        return _caption_packet(caption or "").encode("utf-8")
    seen: set[str] = set()
    text = edit_xmp(raw.decode("utf-8", "replace"), values, no_gps, seen)
    if text is None:
        LOGGER.warning("XMP packet with an unclosed element to remove; dropped")
        return None
    if caption and "dc:description" not in seen:
        text = _add_description(text, caption)
    return text.encode("utf-8")


def _rational(value: float) -> str:
    return str(round(value)) + "/1" if abs(value - round(value)) < 1e-6 else f"{round(value * 10000)}/10000"


def _scaled_rational(old: str, factor: float) -> str:
    """An XMP rational ("300/1") or number times ``factor``; unchanged when it is neither."""
    num, _, den = old.strip().partition("/")
    try:
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return old
    return _rational(value * factor) if value > 0 else old


_RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_DC_NS = "http://purl.org/dc/elements/1.1/"


def _description_xml(caption: str) -> str:
    return (
        f'<rdf:Description rdf:about="" xmlns:dc="{_DC_NS}"><dc:description><rdf:Alt>'
        f'<rdf:li xml:lang="x-default">{xml_escape(caption)}</rdf:li></rdf:Alt>'
        "</dc:description></rdf:Description>"
    )


def _caption_packet(caption: str) -> str:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{_RDF_NS}">'
        f"{_description_xml(caption)}</rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    )


def _add_description(text: str, caption: str) -> str:
    """The packet with one more ``rdf:Description`` holding ``dc:description``, before its
    ``</rdf:RDF>`` (several descriptions of the same resource are valid RDF); unchanged when
    it has no ``rdf:RDF`` under that prefix."""
    end = text.rfind("</rdf:RDF>")
    return text if end < 0 else text[:end] + _description_xml(caption) + text[end:]


_XMP_TAG = re.compile(r"""<[^<>"']*(?:(?:"[^"<]*"|'[^'<]*')[^<>"']*)*>""")
_XMP_NAME = re.compile(r"</?([^\s/>]+)")
# An attribute with the one whitespace character before it (so a removed one leaves none).
_XMP_ATTR = re.compile(r"""(\s)([^\s=/>"']+)(\s*=\s*)("[^"]*"|'[^']*')""")
_XMP_PLACES = frozenset({
    "photoshop:City", "photoshop:State", "photoshop:Country", "Iptc4xmpCore:Location",
    "Iptc4xmpCore:CountryCode",
})


def _xmp_removed(name: str, no_gps: bool) -> bool:
    """XMP properties that hold a thumbnail, or (``no_gps``) locate the photo."""
    if name == "xmp:Thumbnails" or name.startswith(("xapGImg:", "xmpGImg:")):
        return True
    return no_gps and (
        (name.startswith("exif:GPS") and len(name) > 8)
        or name.startswith("Iptc4xmpExt:Location") or name in _XMP_PLACES
    )


def edit_xmp(
    text: str, values: Mapping[str, str | Callable[[str], str]], no_gps: bool,
    seen: set[str] | None = None,
) -> str | None:
    """``text`` with the properties named in ``values`` set (attributes, or elements holding
    only text; a callable value maps the old text to the new) and the thumbnail (and,
    ``no_gps``, location) properties removed, nested content included; ``seen`` collects the
    names of the elements and attributes met. None when an element to remove is never
    closed: where it ends cannot be known, so the packet is not kept. One pass over the tags:
    linear in ``len(text)``."""
    seen = seen if seen is not None else set()
    out: list[str] = []
    last = 0  # text[last:] is not written yet
    skipping, depth = "", 0  # an element being removed, and how deep in it (same name)
    setting = ""  # the element whose start tag was the last tag: its text may be set

    def attribute(m: re.Match[str]) -> str:
        name = m.group(2)
        seen.add(name)
        if _xmp_removed(name, no_gps):
            return ""
        if name in values:
            quote = m.group(4)[0]
            return f"{m.group(1)}{name}{m.group(3)}{quote}{new_value(name, m.group(4)[1:-1])}{quote}"
        return m.group()

    def new_value(name: str, old: str) -> str:
        value = values[name]
        return xml_escape(value(old)) if callable(value) else value

    for m in _XMP_TAG.finditer(text):
        tag = m.group()
        found = _XMP_NAME.match(tag)
        name = found.group(1) if found else ""
        closing, empty = tag.startswith("</"), tag.endswith("/>")
        if skipping:
            if name == skipping and not empty:
                depth += -1 if closing else 1
                if not depth:
                    skipping, last = "", m.end()
            continue
        if not closing and _xmp_removed(name, no_gps):
            out.append(text[last:m.start()])
            last, setting = m.end(), ""
            if not empty:
                skipping, depth = name, 1
            continue
        seen.add(name)
        if setting and closing and name == setting:
            out.append(new_value(name, text[last:m.start()]))
        else:
            out.append(text[last:m.start()])
        out.append(_XMP_ATTR.sub(attribute, tag) if "=" in tag and not closing else tag)
        last = m.end()
        setting = name if name in values and not closing and not empty else ""
    if skipping:
        return None
    out.append(text[last:])
    return "".join(out)
