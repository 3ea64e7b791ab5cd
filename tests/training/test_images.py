"""Image modes as users bring them: each kind decodes to the RGB a viewer shows, and the conversion is recorded.

Inputs are built here with Pillow / numpy (96x96, as the issue's cases); the right values are computed from the
pixels written, not copied from a run.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from training.config import DataConfig, TrainConfig
from training.configuration import ConfigError, validate_values
from training.data import Example, validate_dataset
from training.dataset import load_image
from training.images import ImageReadError, open_rgb

SIZE = (96, 96)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit-per-sample PNG of ``arr`` (H, W) grey or (H, W, 3|4) RGB(A), written by hand (Pillow cannot
    write 48/64-bit PNGs): signature, IHDR, one zlib IDAT of filter-0 rows, IEND (PNG spec, ISO/IEC 15948)."""
    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]
    colour_type = {2: 0, 3: {3: 2, 4: 6}.get(arr.shape[-1])}[arr.ndim]
    raw = b"".join(b"\0" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _at(img: Image.Image, y: int, x: int) -> tuple[int, ...]:
    return tuple(_pixels(img)[y, x].tolist())


def _tensor_levels(path, size=96, background=(255, 255, 255)) -> np.ndarray:
    """What training feeds the VAE, as 0..255 levels: (H, W, 3)."""
    t = load_image(path, size, background=background)
    return (t.add(1).mul(127.5)).permute(1, 2, 0).numpy()


# --- 16-bit greyscale and RGB ---------------------------------------------------------------------------------


def test_16bit_grey_png_reaches_the_vae_as_the_grey_a_viewer_shows(tmp_path):
    """The issue's case 4: 207 (·257) in an I;16 PNG was 255 (white) after convert('RGB')."""
    path = tmp_path / "grey16.png"
    path.write_bytes(png16(np.full((96, 96), 207 * 257, dtype=np.uint16)))
    assert Image.open(path).mode == "I;16"
    levels = _tensor_levels(path)
    assert abs(levels.mean() - 207) <= 1, f"VAE input mean {levels.mean():.1f}, the file shows 207"
    assert "I;16 (16-bit greyscale) -> 8-bit (scaled 1/257)" in open_rgb(path).conversions


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")],  # PNG's, big-endian TIFF's and 32-bit int decoders' modes
)
def test_16bit_grey_is_scaled_with_rounding_in_every_mode(mode, fmt):
    values = np.array([0, 128, 129, 257 * 207 + 128, 257 * 207 + 129, 65535], dtype=np.uint32)
    row = np.tile(values, 16).reshape(1, -1).repeat(96, axis=0)  # 96x96
    data = _encode(Image.fromarray(row.astype(np.int32)).convert(mode), fmt)
    decoded = open_rgb(data)
    assert decoded.mode == mode, f"the {fmt} file decodes as {decoded.mode}, the case is {mode}"
    got, want = _pixels(decoded.image)[0, :6, 0].tolist(), np.round(values / 257).astype(int).tolist()
    assert got == want, f"{values.tolist()} / 257 should round to {want}, got {got}"  # [0, 0, 1, 207, 208, 255]


def test_16bit_rgb_png_is_read_within_one_level_and_noted(tmp_path):
    want = np.array([207, 30, 120])
    arr = np.broadcast_to(want * 257 + 100, (96, 96, 3)).astype(np.uint16)
    decoded = open_rgb(png16(arr))
    got = _pixels(decoded.image).reshape(-1, 3).mean(axis=0)
    assert np.abs(got - want).max() <= 1, f"48-bit PNG read as {got}, written as {want} (x257)"
    assert any(c.startswith("16-bit RGB") for c in decoded.conversions), decoded.conversions


# --- transparency ---------------------------------------------------------------------------------------------


def _palette_with_transparent_black() -> Image.Image:
    """P image: index 0 = black and transparent (left half), index 1 = red (right half)."""
    img = Image.new("P", SIZE, 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.paste(1, (48, 0, 96, 96))
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(("background", "rgb"), [("white", (255, 255, 255)), ("#808080", (128, 128, 128))])
def test_palette_transparency_sits_on_the_configured_background_never_black(tmp_path, background, rgb):
    path = tmp_path / "p.png"
    path.write_bytes(_encode(_palette_with_transparent_black()))
    cfg = DataConfig(path=str(tmp_path), background=background)
    decoded = open_rgb(path, cfg.background_rgb)
    assert _at(decoded.image, 10, 10) == rgb, f"transparent pixel is {_at(decoded.image, 10, 10)}, not {background}"
    assert _at(decoded.image, 10, 80) == (255, 0, 0)
    assert decoded.conversions == (f"P transparency composited on {rgb}",)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white_by_default(mode):
    img = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    img.paste((0, 0, 0, 128), (48, 0, 96, 96))  # right half: black at 50 % opacity
    decoded = open_rgb(_encode(img.convert(mode)))
    seen = _at(decoded.image, 10, 10)
    assert seen == (255, 255, 255), f"fully transparent must show the white background, not {seen}"
    half = _at(decoded.image, 10, 80)
    assert abs(half[0] - 127) <= 1, f"half-transparent black on white should be mid grey, not {half}"
    assert decoded.conversions == (f"{mode} alpha composited on (255, 255, 255)",)


def test_opaque_alpha_is_dropped_without_changing_pixels():
    img = Image.new("RGBA", SIZE, (10, 200, 30, 255))
    decoded = open_rgb(_encode(img))
    assert _at(decoded.image, 0, 0) == (10, 200, 30)
    assert decoded.conversions == ("RGBA: alpha fully opaque, dropped",)


def test_unknown_background_colour_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_values(TrainConfig, {"base_model": "m", "data": {"path": "d"}}, ["data.background=whte"])
    assert "data.background" in str(err.value) and "'whte' is not a colour" in str(err.value)
    with pytest.raises(ValueError, match="not opaque"):
        DataConfig(path=".", background="#ffffff00")


# --- other modes ----------------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb():
    decoded = open_rgb(_encode(Image.new("CMYK", SIZE, (0, 255, 255, 0)), "JPEG", quality=95))
    r, g, b = _pixels(decoded.image).reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15, f"CMYK (0,255,255,0) is red; got {(r, g, b)}"
    assert decoded.mode == "CMYK" and decoded.conversions == ("CMYK -> RGB (no colour profile applied)",)


@pytest.mark.parametrize(
    ("mode", "value", "note"), [("L", 90, "L -> RGB (greyscale)"), ("1", 255, "1 -> RGB (bilevel)")]
)
def test_greyscale_and_bilevel_become_rgb(mode, value, note):
    decoded = open_rgb(_encode(Image.new(mode, SIZE, value)))
    assert decoded.image.mode == "RGB" and _at(decoded.image, 5, 5) == (value,) * 3
    assert decoded.conversions == (note,)


def test_exif_orientation_is_applied_once_as_viewers_do(tmp_path):
    img = Image.new("RGB", (96, 64), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 64))  # a red stripe on the stored left edge
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "phone.jpg"
    path.write_bytes(_encode(img, "JPEG", exif=exif, quality=95))
    decoded = open_rgb(path)
    with Image.open(path) as stored:
        want = ImageOps.exif_transpose(stored).convert("RGB")
    assert decoded.size == (96, 64) and decoded.image.size == (64, 96)
    assert np.array_equal(_pixels(decoded.image), _pixels(want))
    assert _pixels(decoded.image)[4, 32, 0] > 200, "the stored left edge shows at the top after orientation 6"
    assert decoded.conversions == ("EXIF orientation 6 applied",)
    assert load_image(path, (64, 96)).shape == (3, 96, 64)  # training sees it upright too


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_keeps_the_first_frame_and_validation_warns(tmp_path, fmt):
    frames = [Image.new("RGB", SIZE, (200, 40 * i, 0)) for i in range(5)]
    path = tmp_path / f"anim.{fmt.lower()}"
    path.write_bytes(_encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True))
    decoded = open_rgb(path)
    assert decoded.frames == 5 and "animated: first of 5 frames" in decoded.conversions
    assert np.abs(_pixels(decoded.image)[50, 50] - (200, 0, 0)).max() <= 2, "the first frame, not a later one"
    for i in range(5):
        (tmp_path / f"still{i}.png").write_bytes(_encode(Image.new("RGB", SIZE, (i, 9, 9))))
        (tmp_path / f"still{i}.txt").write_text("a sks thing")
    (tmp_path / "anim.txt").write_text("a sks thing")
    report = validate_dataset(DataConfig(path=str(tmp_path), resolution=64))
    assert not report.errors and len(report.examples) == 6
    warned = [p for p in report.problems if p.file == path.name]
    assert len(warned) == 1 and warned[0].severity == "warning" and "5 frames" in warned[0].message


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow build has no AVIF codec")
def test_avif_is_read_by_pillow_itself():
    decoded = open_rgb(_encode(Image.new("RGB", SIZE, (30, 160, 90)), "AVIF", quality=100))
    assert np.abs(_pixels(decoded.image)[40, 40] - (30, 160, 90)).max() <= 6


def test_heic_is_refused_naming_the_format_and_the_conversion(tmp_path):
    # the ISO-BMFF header an iPhone's .HEIC starts with: box size, 'ftyp', major brand 'heic'
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + bytes(64)
    with pytest.raises(ImageReadError, match=r"HEIC/HEIF .* convert it to JPEG or PNG"):
        open_rgb(heic)
    for i in range(4):
        (tmp_path / f"ok{i}.png").write_bytes(_encode(Image.new("RGB", SIZE, (i, 0, 0))))
        (tmp_path / f"ok{i}.txt").write_text("sks")
    (tmp_path / "IMG_0001.HEIC").write_bytes(heic)  # extension matched case-insensitively: named, not skipped
    (tmp_path / "IMG_0001.txt").write_text("sks")
    problems = {p.file: p for p in validate_dataset(DataConfig(path=str(tmp_path), resolution=64)).problems}
    assert problems["IMG_0001.HEIC"].severity == "error" and "sips" in problems["IMG_0001.HEIC"].message


# --- the report: every conversion listed per file -------------------------------------------------------------


def test_a_mixed_folder_trains_on_all_six_and_lists_each_conversion(tmp_path):
    files = {
        "a_grey16.png": png16(np.full((96, 96), 207 * 257, dtype=np.uint16)),
        "b_palette.png": _encode(_palette_with_transparent_black()),
        "c_rgba.png": _encode(Image.new("RGBA", SIZE, (0, 0, 0, 0))),
        "d_cmyk.jpg": _encode(Image.new("CMYK", SIZE, (0, 0, 0, 0)), "JPEG"),
        "e_grey.png": _encode(Image.new("L", SIZE, 50)),
        "f_rgb.png": _encode(Image.new("RGB", SIZE, (1, 2, 3))),
    }
    rows = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        rows.append({"file_name": name, "text": f"a sks photo {name[0]}"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = validate_dataset(DataConfig(path=str(tmp_path), trigger="sks", resolution=64))
    assert not report.problems, report.summary()
    conv = {e.path.name: e.conversions for e in report.examples}
    assert conv == {
        "a_grey16.png": ("I;16 (16-bit greyscale) -> 8-bit (scaled 1/257)", "L -> RGB (greyscale)"),
        "b_palette.png": ("P transparency composited on (255, 255, 255)",),
        "c_rgba.png": ("RGBA alpha composited on (255, 255, 255)",),
        "d_cmyk.jpg": ("CMYK -> RGB (no colour profile applied)",),
        "e_grey.png": ("L -> RGB (greyscale)",),
        "f_rgb.png": (),
    }
    summary = report.summary()
    for name, notes in conv.items():
        assert (f"convert {name}: {'; '.join(notes)}" in summary) == bool(notes), summary
    ex = report.examples[0]
    assert Example.from_row(json.loads(json.dumps(ex.to_row()))) == ex  # the notes travel to Ray workers
