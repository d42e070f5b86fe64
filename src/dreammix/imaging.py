"""Small PIL helpers shared by the training callback and the inpaint command."""

from __future__ import annotations

from PIL import Image


def image_strip(images: list[Image.Image]) -> Image.Image:
    """Concatenate same-height images left to right into one RGB image (a preview strip)."""
    width = sum(im.width for im in images)
    strip = Image.new("RGB", (width, images[0].height))
    x = 0
    for im in images:
        strip.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return strip
