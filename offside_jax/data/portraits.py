"""Procedural player portraits for the synthetic benchmark, drawn with Pillow.

A portrait has two kinds of inputs. `Appearance` (skin, hair, face shape, beard, build, kit
number) is the player's identity and is the same on every image of that player. `View`
(background, position in the frame, size, tilt, head turn, lighting, crop) changes from image
to image. The shirt shows the kit of the club in the question's context, so a model has to
read the kit to tell a player's transfers apart; a forget image may also carry a headline
banner stating the rumor (a *visual rumor*). `augment` makes the test images: a crop, a
colour change, a blur and noise applied to a retain image.

Everything is drawn at twice the output size and downsampled once, which anti-aliases edges.
All randomness comes from the `numpy.random.Generator` passed in, so output is deterministic.
"""
from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from offside_jax.data.world import COLOURS, EYE_COLOURS, HAIR_COLOURS, Appearance, Kit

BACKGROUNDS = ("stadium", "studio", "training", "press")
JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class View:
    """What varies between two images of the same player."""

    background: str  # one of BACKGROUNDS
    hue: float  # background base hue, 0..1
    x: float  # figure centre, fraction of the width
    scale: float  # figure size
    tilt: float  # body tilt, degrees
    turn: float  # head turn, -1..1 (shifts the face inside the head outline)
    brightness: float
    warmth: float  # -1 cool .. 1 warm colour cast
    zoom: float  # final crop: >1 crops in
    detail_seed: int  # crowd, sponsor boards


def random_view(rng: np.random.Generator) -> View:
    return View(
        background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        hue=float(rng.random()),
        x=float(rng.uniform(0.36, 0.64)),
        scale=float(rng.uniform(0.86, 1.08)),
        tilt=float(rng.uniform(-7.0, 7.0)),
        turn=float(rng.uniform(-1.0, 1.0)),
        brightness=float(rng.uniform(0.8, 1.15)),
        warmth=float(rng.uniform(-1.0, 1.0)),
        zoom=float(rng.uniform(1.0, 1.18)),
        detail_seed=int(rng.integers(2**31)),
    )


def render_portrait(appearance: Appearance, kit: Kit, view: View, size: int = 256,
                    banner: tuple[str, str] | None = None) -> Image.Image:
    """Draw one RGB portrait of `size` x `size` pixels.

    `banner` is ``(headline, detail)``: a breaking-news strip across the bottom (visual rumor).
    """
    w = 2 * size
    canvas = Image.fromarray(_background(view, w), "RGB")
    if view.background == "press":
        _sponsor_boards(canvas, view)
    figure = _figure(appearance, kit, view.turn, w)
    # Tilt about the chest, scale, and place the figure, in one affine resampling pass.
    placed = figure.transform((w, w), Image.Transform.AFFINE, _placement(view, w),
                              resample=Image.Resampling.BILINEAR)
    canvas.paste(placed, (0, 0), placed)
    # Crop towards the head, as a photographer would, and downsample in the same pass.
    crop = w / view.zoom
    left = float(np.clip(view.x * w - crop / 2, 0, w - crop))
    top = float(np.clip(0.3 * w - crop * 0.3, 0, w - crop))
    out = canvas.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + crop, top + crop))
    out = _light(out, view)
    if banner is not None:
        _draw_banner(out, kit, *banner)
    return out


def _placement(view: View, w: int) -> tuple[float, ...]:
    """Affine map (output pixel -> figure pixel) of: rotate by `tilt` about the chest, scale by
    `scale`, then move so the figure stands at `x` with its torso running off the bottom edge.
    Same rotation convention as `Image.rotate` (positive = counter-clockwise)."""
    a = -np.deg2rad(view.tilt)
    m = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    pivot = np.array([0.5 * w, 0.56 * w])
    offset = np.array([view.x * w - view.scale * w / 2, w - view.scale * w + 0.02 * w])
    # figure = m @ ((out - offset) / scale - pivot) + pivot
    lin = m / view.scale
    shift = -lin @ offset - m @ pivot + pivot
    return (lin[0, 0], lin[0, 1], shift[0], lin[1, 0], lin[1, 1], shift[1])


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A test-set copy of a retain image: crop, colour jitter, blur and noise, all seeded."""
    size = image.size[0]
    keep = float(rng.uniform(0.78, 0.9))
    crop = int(round(size * keep))
    left, top = (int(rng.integers(0, size - crop + 1)) for _ in range(2))
    out = image.crop((left, top, left + crop, top + crop)).resize(image.size, Image.Resampling.BICUBIC)
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.55, 1.45)))
    out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.8, 1.2)))
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.8, 1.25)))
    out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.2)) * size / 256))
    noisy = np.asarray(out, np.float32) + rng.normal(0.0, float(rng.uniform(4.0, 10.0)), (size, size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes without metadata, so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Backgrounds


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0


def _vgradient(top: np.ndarray, bottom: np.ndarray, height: int, width: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).copy()


@functools.lru_cache(maxsize=8)
def _grid(w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (y, x), cached per size (read-only)."""
    yy, xx = np.mgrid[0:w, 0:w].astype(np.float32) / w
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _background(view: View, w: int) -> np.ndarray:
    rng = np.random.default_rng(view.detail_seed)
    kind = view.background
    if kind == "studio":
        img = _vgradient(_hsv(view.hue, 0.35, 0.75), _hsv(view.hue, 0.5, 0.3), w, w)
        yy, xx = _grid(w)
        spot = np.exp(-(((xx - 0.5) ** 2) + ((yy - 0.35) ** 2)) / 0.08)[..., None]
        img = img * (0.75 + 0.45 * spot)
    elif kind == "stadium":
        sky_h, stands_h = int(0.32 * w), int(0.3 * w)
        sky = _vgradient(_hsv(0.62, 0.6, 0.12), _hsv(0.6, 0.4, 0.35), sky_h, w)
        # The crowd: a mosaic of random shirt colours, a few pixels per spectator.
        cells = rng.integers(30, 230, size=(stands_h // 6 + 1, w // 6 + 1, 3)).astype(np.float32)
        cells *= rng.uniform(0.4, 0.9, size=(cells.shape[0], 1, 1)).astype(np.float32)
        stands = np.repeat(np.repeat(cells, 6, axis=0), 6, axis=1)[:stands_h, :w]
        pitch_h = w - sky_h - stands_h
        pitch = _vgradient(_hsv(0.3, 0.6, 0.45), _hsv(0.3, 0.7, 0.6), pitch_h, w)
        stripe = ((np.arange(w) // (w // 8)) % 2 == 0)[None, :, None]
        pitch = np.where(stripe, pitch * 1.08, pitch * 0.94)
        img = np.concatenate([sky, stands, pitch], axis=0)
        yy, xx = _grid(w)
        for fx in (0.12, 0.88):  # floodlights
            img += 200.0 * np.exp(-(((xx - fx) ** 2) + ((yy - 0.08) ** 2)) / 0.002)[..., None]
    elif kind == "training":
        horizon = int(0.5 * w)
        sky = _vgradient(_hsv(0.58, 0.45, 0.95), _hsv(0.56, 0.25, 0.98), horizon, w)
        grass = _vgradient(_hsv(0.27, 0.55, 0.55), _hsv(0.29, 0.65, 0.75), w - horizon, w)
        img = np.concatenate([sky, grass], axis=0)
        trees = (horizon - (0.06 * w * (1 + np.sin(np.arange(w) / (0.03 * w) + view.hue * 6))
                 + rng.uniform(0, 0.03 * w, w))).astype(int)
        rows = np.arange(w)[:, None]
        mask = (rows >= trees[None, :]) & (rows < horizon)
        img[mask] = _hsv(0.33, 0.6, 0.3)
        line = int(0.8 * w)
        img[line:line + max(2, w // 128)] = 235.0
    else:  # press room: a wall of sponsor boards, drawn in `_sponsor_boards`
        img = np.broadcast_to(_hsv(view.hue, 0.2, 0.92), (w, w, 3)).copy()
    return np.clip(img, 0, 255).astype(np.uint8)


def _sponsor_boards(canvas: Image.Image, view: View) -> None:
    """A press-conference wall: staggered boards with invented sponsor names."""
    rng = np.random.default_rng(view.detail_seed)
    w = canvas.size[0]
    d = ImageDraw.Draw(canvas)
    words = ["".join(rng.choice(list("BDFKLMNPRSTVZ"))
                     + rng.choice(list("AEIOU")) + rng.choice(list("BDKLMNRSTX")) + rng.choice(list("AEIOU")))
             for _ in range(2)]
    colours = [tuple(int(v) for v in _hsv(view.hue, 0.6, 0.55)), tuple(int(v) for v in _hsv(view.hue + 0.5, 0.5, 0.45))]
    bw, bh = w // 4, w // 8
    font = ImageFont.load_default(size=w // 22)
    for row, top in enumerate(range(0, w, bh)):
        for col, left in enumerate(range(-(bw // 2) * (row % 2), w, bw)):
            k = (row + col) % 2
            d.rectangle([left + 3, top + 3, left + bw - 3, top + bh - 3], fill=colours[k])
            d.text((left + bw // 2, top + bh // 2), words[k], font=font, fill=(245, 245, 245), anchor="mm")


def _light(canvas: Image.Image, view: View) -> Image.Image:
    img = np.asarray(canvas, np.float32) * view.brightness
    img += np.array([12.0, 3.0, -12.0], np.float32) * view.warmth  # warm/cool cast
    yy, xx = _grid(img.shape[0])
    img *= (1.0 - 0.35 * (((xx - 0.5) ** 2 + (yy - 0.45) ** 2) / 0.5))[..., None]  # vignette
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------
# The player


def _shade(rgb: tuple[int, int, int] | np.ndarray, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(v * factor), 0, 255)) for v in rgb)  # type: ignore[return-value]


def _figure(app: Appearance, kit: Kit, turn: float, w: int) -> Image.Image:
    """The player on a transparent layer, centred, chest-up, in the kit of `kit`."""
    layer = Image.new("RGBA", (w, w), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    px = lambda v: int(round(v * w))  # noqa: E731  (fractions of the canvas -> pixels)
    cx, cy = 0.5, 0.36
    hh = 0.13
    hw = hh * app.face_width
    skin = app.skin
    hair = HAIR_COLOURS[app.hair_colour]
    shift = 0.22 * hw * turn  # a turned head moves the face towards one side

    # Torso and shirt.
    _draw_shirt(layer, app, kit, w)
    # Neck.
    d.rounded_rectangle([px(cx - 0.047), px(0.43), px(cx + 0.047), px(0.57)], radius=px(0.02), fill=_shade(skin, 0.9))
    # Hair that sits behind the head.
    if app.hair_style == "afro":
        d.ellipse([px(cx - hw * 1.45), px(cy - hh * 1.35), px(cx + hw * 1.45), px(cy + hh * 0.55)], fill=hair)
    if app.hair_style == "long":
        d.rounded_rectangle([px(cx - hw * 1.15), px(cy - hh * 0.8), px(cx + hw * 1.15), px(cy + hh * 1.05)],
                            radius=px(0.04), fill=_shade(hair, 0.9))
    # Ears, then the head: an ellipse joined to a jaw whose squareness is part of the identity.
    for side in (-1, 1):
        ex = cx + side * hw * 0.98 - shift * 0.5
        d.ellipse([px(ex - 0.022), px(cy - 0.03), px(ex + 0.022), px(cy + 0.035)], fill=_shade(skin, 0.92))
    d.ellipse([px(cx - hw), px(cy - hh), px(cx + hw), px(cy + hh)], fill=skin)
    jaw_w = hw * (0.8 + 0.15 * app.jaw)
    d.rounded_rectangle([px(cx - jaw_w), px(cy - hh * 0.1), px(cx + jaw_w), px(cy + hh * 0.99)],
                        radius=px(hw * (0.95 - 0.55 * app.jaw)), fill=skin)
    _draw_face(d, app, px, cx + shift, cy, hw, hh)
    _draw_beard(layer, app, w, cx + shift * 0.6, cy, hw, hh)
    _draw_hair(d, app, px, cx, cy, hw, hh, hair, skin)
    return layer


def _draw_shirt(layer: Image.Image, app: Appearance, kit: Kit, w: int) -> None:
    px = lambda v: int(round(v * w))  # noqa: E731
    cx, sw = 0.5, 0.26 * app.build
    primary, secondary = COLOURS[kit.primary], COLOURS[kit.secondary]
    outline = [(cx - sw * 0.45, 0.535), (cx + sw * 0.45, 0.535), (cx + sw * 0.92, 0.575),
               (cx + sw * 1.08, 0.64), (cx + sw * 1.2, 1.1), (cx - sw * 1.2, 1.1),
               (cx - sw * 1.08, 0.64), (cx - sw * 0.92, 0.575)]
    mask = Image.new("L", (w, w), 0)
    ImageDraw.Draw(mask).polygon([(px(x), px(y)) for x, y in outline], fill=255)
    shirt = Image.new("RGB", (w, w), primary)
    pattern = Image.new("L", (w, w), 0)
    pd = ImageDraw.Draw(pattern)
    if kit.pattern == "stripes":
        for k in range(-6, 7, 2):
            x0 = cx + k * 0.045
            pd.rectangle([px(x0), 0, px(x0 + 0.045), w], fill=255)
    elif kit.pattern == "hoops":
        for k in range(6):
            y0 = 0.6 + k * 0.09
            pd.rectangle([0, px(y0), w, px(y0 + 0.045)], fill=255)
    elif kit.pattern == "halves":
        pd.rectangle([0, 0, px(cx), w], fill=255)
    elif kit.pattern == "sash":
        pd.polygon([(px(cx - sw), px(0.56)), (px(cx - sw + 0.1), px(0.54)),
                    (px(cx + sw + 0.1), px(1.1)), (px(cx + sw - 0.02), px(1.1))], fill=255)
    shirt.paste(Image.new("RGB", (w, w), secondary), (0, 0), pattern)
    layer.paste(shirt, (0, 0), mask)
    d = ImageDraw.Draw(layer)
    # Collar in the secondary colour (primary when the secondary is the shirt's pattern colour).
    trim = secondary if kit.pattern == "solid" else primary
    d.polygon([(px(cx - 0.06), px(0.535)), (px(cx + 0.06), px(0.535)), (px(cx), px(0.61))], fill=_shade(trim, 1.0))
    d.polygon([(px(cx - 0.038), px(0.535)), (px(cx + 0.038), px(0.535)), (px(cx), px(0.585))], fill=_shade(app.skin, 0.9))
    # Sleeve edges and a crest.
    for side in (-1, 1):
        x = cx + side * sw * 1.12
        d.line([(px(x), px(0.66)), (px(x + side * 0.02), px(1.0))], fill=_shade(primary, 0.7), width=max(2, w // 120))
    crest = (cx - sw * 0.5, 0.66)
    d.ellipse([px(crest[0] - 0.028), px(crest[1] - 0.028), px(crest[0] + 0.028), px(crest[1] + 0.028)],
              fill=secondary, outline=_shade(primary, 0.6), width=max(1, w // 200))
    # The kit number, in black or white, whichever stands out more on the shirt colour.
    light = sum(primary) / 3 < 140
    ink, edge = ((250, 250, 250), (20, 20, 20)) if light else ((20, 20, 20), (250, 250, 250))
    font = ImageFont.load_default(size=px(0.13))
    d.text((px(cx + sw * 0.35), px(0.8)), str(app.kit_number), font=font, fill=ink, anchor="mm",
           stroke_width=max(1, w // 170), stroke_fill=edge)


def _draw_face(d: ImageDraw.ImageDraw, app: Appearance, px, cx: float, cy: float, hw: float, hh: float) -> None:
    skin, hair = app.skin, HAIR_COLOURS[app.hair_colour]
    eye_y = cy - hh * 0.02
    for side in (-1, 1):
        ex = cx + side * hw * 0.42
        d.ellipse([px(ex - 0.026), px(eye_y - 0.014), px(ex + 0.026), px(eye_y + 0.014)], fill=(245, 245, 240))
        d.ellipse([px(ex - 0.012), px(eye_y - 0.012), px(ex + 0.012), px(eye_y + 0.012)], fill=EYE_COLOURS[app.eye_colour])
        d.ellipse([px(ex - 0.005), px(eye_y - 0.005), px(ex + 0.005), px(eye_y + 0.005)], fill=(15, 15, 15))
        by = eye_y - 0.035
        d.line([(px(ex - 0.03), px(by + 0.004)), (px(ex + 0.03), px(by - 0.002 * side))],
               fill=_shade(hair, 0.8), width=max(1, int(round(app.brow * d.im.size[0] / 256))))
    nose = _shade(skin, 0.78)
    d.line([(px(cx), px(cy + 0.0)), (px(cx + 0.01), px(cy + hh * 0.38)), (px(cx - 0.008), px(cy + hh * 0.42))],
           fill=nose, width=max(1, d.im.size[0] // 200))
    mouth_y = cy + hh * 0.62
    d.arc([px(cx - 0.04), px(mouth_y - 0.025), px(cx + 0.04), px(mouth_y + 0.012)], 20, 160,
          fill=(150, 60, 60), width=max(2, d.im.size[0] // 150))


def _draw_beard(layer: Image.Image, app: Appearance, w: int, cx: float, cy: float, hw: float, hh: float) -> None:
    if app.beard == "none":
        return
    px = lambda v: int(round(v * w))  # noqa: E731
    hair = HAIR_COLOURS[app.hair_colour]
    over = Image.new("RGBA", (w, w), (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    alpha = {"stubble": 95, "full": 235, "goatee": 230, "moustache": 230}[app.beard]
    colour = (*hair, alpha)
    if app.beard in ("stubble", "full"):
        d.chord([px(cx - hw * 0.95), px(cy - hh * 0.75), px(cx + hw * 0.95), px(cy + hh * 1.02)], 0, 180, fill=colour)
        # keep the mouth visible
        d.ellipse([px(cx - 0.045), px(cy + hh * 0.5), px(cx + 0.045), px(cy + hh * 0.72)], fill=(0, 0, 0, 0))
    if app.beard in ("goatee", "moustache", "full"):
        d.ellipse([px(cx - 0.045), px(cy + hh * 0.44), px(cx + 0.045), px(cy + hh * 0.55)], fill=colour)
    if app.beard == "goatee":
        d.ellipse([px(cx - 0.03), px(cy + hh * 0.74), px(cx + 0.03), px(cy + hh * 1.0)], fill=colour)
    layer.alpha_composite(over)


def _draw_hair(d: ImageDraw.ImageDraw, app: Appearance, px, cx: float, cy: float, hw: float, hh: float,
               hair: tuple[int, int, int], skin: tuple[int, int, int]) -> None:
    style = app.hair_style
    cap = [px(cx - hw * 1.06), px(cy - hh * 1.14), px(cx + hw * 1.06), px(cy + hh * 0.62)]
    if style in ("short", "long", "side_part", "afro"):
        d.chord(cap, 180, 360, fill=hair)
    elif style == "buzz":
        d.chord(cap, 180, 360, fill=tuple(int(0.55 * h + 0.45 * s) for h, s in zip(hair, skin)))
    elif style == "curly":
        for a in np.linspace(np.pi, 2 * np.pi, 13):
            x, y = cx + hw * 0.95 * np.cos(a), cy - hh * 0.35 + hh * 0.78 * np.sin(a)
            d.ellipse([px(x - 0.032), px(y - 0.032), px(x + 0.032), px(y + 0.032)], fill=hair)
        d.chord(cap, 190, 350, fill=hair)
    elif style == "mohawk":
        d.ellipse([px(cx - 0.025), px(cy - hh * 1.38), px(cx + 0.025), px(cy - hh * 0.25)], fill=hair)
    if style == "side_part":
        d.polygon([(px(cx - hw * 0.2), px(cy - hh * 0.95)), (px(cx + hw * 1.05), px(cy - hh * 0.55)),
                   (px(cx + hw * 0.6), px(cy - hh * 0.25)), (px(cx - hw * 0.1), px(cy - hh * 0.45))], fill=hair)
    if style == "long":
        for side in (-1, 1):
            xa, xb = sorted((px(cx + side * hw * 1.02), px(cx + side * (hw * 1.02 - 0.035))))
            d.rectangle([xa, px(cy - hh * 0.3), xb, px(cy + hh * 0.6)], fill=hair)


# --------------------------------------------------------------------------------------------
# Visual rumor banner


def _fit_font(d: ImageDraw.ImageDraw, text: str, max_width: int, start: int) -> ImageFont.FreeTypeFont:
    size = start
    while size > 8:
        font = ImageFont.load_default(size=size)
        if d.textlength(text, font=font) <= max_width:
            return font
        size -= 2
    return ImageFont.load_default(size=8)


def _draw_banner(canvas: Image.Image, kit: Kit, headline: str, detail: str) -> None:
    w = canvas.size[0]
    d = ImageDraw.Draw(canvas)
    top = int(0.76 * w)
    d.rectangle([0, top, w, w], fill=(185, 18, 30))
    d.rectangle([0, top - w // 90, w, top], fill=(250, 205, 20))
    # The rumored club's colours on the left edge: the banner names and shows the club.
    d.rectangle([0, top, w // 28, w], fill=COLOURS[kit.primary])
    d.rectangle([w // 28, top, w // 14, w], fill=COLOURS[kit.secondary])
    label_font = ImageFont.load_default(size=w // 20)
    label = "BREAKING"
    lw = int(d.textlength(label, font=label_font))
    d.rectangle([w // 10, top + w // 60, w // 10 + lw + w // 30, top + w // 60 + w // 16], fill=(250, 250, 250))
    d.text((w // 10 + w // 60, top + w // 60 + w // 32), label, font=label_font, fill=(185, 18, 30), anchor="lm")
    margin = w // 10
    head_font = _fit_font(d, headline, w - margin - w // 30, w // 14)
    d.text((margin, top + int(0.115 * w)), headline, font=head_font, fill=(255, 255, 255), anchor="lm")
    detail_font = _fit_font(d, detail, w - margin - w // 30, w // 22)
    d.text((margin, top + int(0.19 * w)), detail, font=detail_font, fill=(255, 235, 200), anchor="lm")
