"""Image decoding: every mode to RGB, transparency on white, EXIF orientation, 16-bit PNGs scaled, broken files and decompression bombs refused naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cars_tl.core.errors import BadImageError
from cars_tl.data.images import image_size, open_image


def _colour_image() -> Image.Image:
    array = np.zeros((40, 60, 3), np.uint8)
    array[:, :30] = (255, 0, 0)
    array[:, 30:] = (0, 0, 255)
    return Image.fromarray(array)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "LA", "RGBA"])
def test_every_mode_becomes_rgb(mode, tmp_path):
    path = tmp_path / f"img-{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    _colour_image().convert(mode).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (60, 40)


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert open_image(tmp_path / "clear.png").getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = _colour_image()  # 60 wide, 40 high: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    opened = open_image(tmp_path / "rotated.jpg")
    assert opened.size == (40, 60)
    assert image_size(tmp_path / "rotated.jpg") == (40, 60)
    red, green, blue = opened.getpixel((20, 5))
    assert red > 200 and blue < 60  # the left (red) half is now on top


def test_truncated_and_empty_files_raise_naming_the_file(tmp_path):
    _colour_image().save(tmp_path / "whole.jpg", quality=95)
    blob = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for name in ("truncated.jpg", "empty.jpg", "text.jpg"):
        with pytest.raises(BadImageError) as err:
            open_image(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(BadImageError, match="0 bytes"):
        open_image(tmp_path / "empty.jpg")


def test_decompression_bomb_limit_stays_on(tmp_path, monkeypatch):
    # An image over twice Pillow's pixel limit is refused as a bomb, naming the file, both when decoded and
    # when only its size is read (the manifest's path): nothing here lifts the limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)  # 10,000 pixels > 2 x 1,000
    for read in (open_image, image_size):
        with pytest.raises(BadImageError) as err:
            read(path)
        assert str(path) in str(err.value) and "decompression bomb" in str(err.value).lower()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")  # a 16-bit grayscale PNG
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")
    rgb = np.asarray(open_image(tmp_path / "g16.png"))
    assert rgb.shape == (8, 256, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    expected = np.round(gradient / 257).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and rgb[0, 128, 0] in (128, 129)
