"""Shared drawing for the synthetic screens: boxes, palettes, fonts, window chrome, text layout and noise."""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from training.screens import words

RGB = tuple[int, int, int]

# matplotlib ships the DejaVu fonts, so every machine renders the same glyphs.
FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONT_FILES = {
    ("sans", False): "DejaVuSans.ttf",
    ("sans", True): "DejaVuSans-Bold.ttf",
    ("serif", False): "DejaVuSerif.ttf",
    ("serif", True): "DejaVuSerif-Bold.ttf",
    ("mono", False): "DejaVuSansMono.ttf",
    ("mono", True): "DejaVuSansMono-Bold.ttf",
    # A Times-like serif no random draw picks: only style families ask for it.
    ("stix", False): "STIXGeneral.ttf",
    ("stix", True): "STIXGeneralBol.ttf",
}


@dataclass(frozen=True)
class Box:
    """A pixel box; x0/y0 inclusive, x1/y1 exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    def contains(self, x: float, y: float) -> bool:
        """Whether the point (x, y) lies inside the box."""
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1

    def intersects(self, other: Box) -> bool:
        """Whether the two boxes share a pixel."""
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    @property
    def center(self) -> tuple[int, int]:
        """The box's centre pixel (always inside a non-empty box)."""
        return (self.x0 + self.x1 - 1) // 2, (self.y0 + self.y1 - 1) // 2

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_list(self) -> list[int]:
        """[x0, y0, x1, y1], the form stored in ground truth."""
        return [self.x0, self.y0, self.x1, self.y1]

    def inset(self, dx: int, dy: int | None = None) -> Box:
        """The box shrunk by dx on the left and right and dy (default dx) on the top and bottom."""
        dy = dx if dy is None else dy
        return Box(self.x0 + dx, self.y0 + dy, self.x1 - dx, self.y1 - dy)

    def rect(self) -> tuple[int, int, int, int]:
        """The inclusive rectangle Pillow's drawing functions expect."""
        return self.x0, self.y0, self.x1 - 1, self.y1 - 1


@dataclass
class Screen:
    """One synthetic screenshot and its JSON-serialisable ground truth."""

    kind: str
    image: Image.Image
    truth: dict


@dataclass(frozen=True)
class Palette:
    """Colours of one screen; accent is the highlight colour, on_accent the text drawn on it, link accent-coloured
    text on the surface (lighter than accent on dark themes)."""

    name: str
    bg: RGB
    surface: RGB
    text: RGB
    muted: RGB
    border: RGB
    accent: RGB
    on_accent: RGB
    tint: RGB
    link: RGB
    chrome: RGB
    chrome_text: RGB


ACCENTS: tuple[RGB, ...] = (
    (37, 99, 235),
    (22, 128, 61),
    (124, 58, 237),
    (200, 35, 51),
    (13, 128, 120),
    (194, 65, 12),
    (190, 24, 93),
    (3, 105, 161),
)


def blend(a: RGB, b: RGB, t: float) -> RGB:
    """Colour t of the way from a to b."""
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


THEMES = ("light", "dark", "coloured")


def random_palette(rng: random.Random) -> Palette:
    """A light, dark or coloured theme with one accent colour."""
    accent = rng.choice(ACCENTS)
    style = rng.choices(THEMES, weights=(5, 3, 2))[0]
    return theme_palette(rng, style, accent)


def theme_palette(rng: random.Random, theme: str, accent: RGB) -> Palette:
    """The palette of one of THEMES around accent; rng draws the background (and chrome) shade."""
    white: RGB = (255, 255, 255)
    if theme == "light":
        bg = rng.choice(((255, 255, 255), (248, 249, 251), (243, 244, 246)))
        chrome = rng.choice(((232, 234, 237), (222, 225, 230), blend(accent, (20, 20, 30), 0.35)))
        chrome_text = (255, 255, 255) if sum(chrome) < 400 else (40, 42, 48)
        return Palette("light", bg, white, (30, 32, 38), (105, 112, 124), (206, 211, 218), accent, white,
                       blend(accent, white, 0.85), accent, chrome, chrome_text)
    if theme == "dark":
        bg = rng.choice(((30, 31, 34), (24, 26, 31), (37, 37, 42)))
        surface = blend(bg, white, 0.07)
        accent = blend(accent, white, 0.12)
        return Palette("dark", bg, surface, (232, 234, 238), (150, 156, 166), (72, 75, 82), accent, white,
                       blend(accent, surface, 0.7), blend(accent, white, 0.5), blend(bg, (0, 0, 0), 0.35),
                       (220, 222, 228))
    bg = blend(accent, white, rng.uniform(0.88, 0.94))
    return Palette("coloured", bg, white, (28, 30, 40), (96, 102, 118), blend(accent, white, 0.65), accent, white,
                   blend(accent, white, 0.8), accent, blend(accent, (0, 0, 0), 0.15), white)


@lru_cache(maxsize=None)
def font(family: str, size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """A DejaVu font: family is 'sans', 'serif' or 'mono'."""
    return ImageFont.truetype(str(FONT_DIR / FONT_FILES[(family, bold)]), size)


@dataclass(frozen=True)
class Fonts:
    """A screen's type scale: one family, a base size, and scaled variants."""

    family: str
    size: int

    def regular(self, scale: float = 1.0) -> ImageFont.FreeTypeFont:
        return font(self.family, max(8, round(self.size * scale)))

    def bold(self, scale: float = 1.0) -> ImageFont.FreeTypeFont:
        return font(self.family, max(8, round(self.size * scale)), bold=True)


def random_fonts(rng: random.Random, low: int = 11, high: int = 15, mono_weight: int = 1) -> Fonts:
    """Mostly sans UI fonts, sometimes serif or monospace, base size in [low, high]."""
    family = rng.choices(("sans", "serif", "mono"), weights=(7, 2, mono_weight))[0]
    return Fonts(family, rng.randint(low, high))


def random_size(rng: random.Random, portrait_share: float = 0.15) -> tuple[int, int]:
    """(width, height): landscape between about 480x360 and 800x600, sometimes portrait-ish."""
    if rng.random() < portrait_share:
        width = rng.randint(460, 560)
        return width, rng.randint(max(width + 40, 560), 640)
    width = rng.randint(480, 800)
    return width, rng.randint(360, min(600, width - 60))


def text_size(fnt: ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    """Advance width and line height of text in fnt."""
    ascent, descent = fnt.getmetrics()
    return round(fnt.getlength(text)), ascent + descent


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fnt: ImageFont.FreeTypeFont,
              fill: RGB, anchor: str = "la") -> Box:
    """Draws text and returns its ink box."""
    draw.text(xy, text, font=fnt, fill=fill, anchor=anchor)
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=fnt, anchor=anchor)
    return Box(math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))


def truncate(fnt: ImageFont.FreeTypeFont, text: str, max_width: int) -> str:
    """text, cut and ended with an ellipsis where it is wider than max_width."""
    if fnt.getlength(text) <= max_width:
        return text
    while text and fnt.getlength(text + "…") > max_width:
        text = text[:-1]
    return text.rstrip() + "…"


def wrap(fnt: ImageFont.FreeTypeFont, text: str, max_width: int) -> list[str]:
    """Greedy word wrap of text to lines no wider than max_width (a single long word stays whole)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and fnt.getlength(candidate) > max_width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines


def draw_shadowed_panel(draw: ImageDraw.ImageDraw, box: Box, palette: Palette, radius: int = 6) -> None:
    """A floating panel (popup, dropdown, card) with a soft offset shadow."""
    shadow = blend(palette.bg, (0, 0, 0), 0.25 if palette.name == "dark" else 0.12)
    for offset in (4, 2):
        draw.rounded_rectangle((box.x0 + offset - 1, box.y0 + offset, box.x1 - 1 + offset, box.y1 - 1 + offset),
                               radius=radius, fill=blend(shadow, palette.bg, offset / 5))
    draw.rounded_rectangle(box.rect(), radius=radius, fill=palette.surface, outline=palette.border)


def draw_input(draw: ImageDraw.ImageDraw, box: Box, palette: Palette, focused: bool = False, radius: int = 4) -> None:
    """An empty text-input rectangle."""
    draw.rounded_rectangle(box.rect(), radius=radius, fill=palette.surface,
                           outline=palette.accent if focused else palette.border, width=2 if focused else 1)


def draw_button(draw: ImageDraw.ImageDraw, box: Box, label: str, fnt: ImageFont.FreeTypeFont, palette: Palette,
                primary: bool, radius: int = 4) -> None:
    """A filled (primary) or outlined button with a centred label."""
    if primary:
        draw.rounded_rectangle(box.rect(), radius=radius, fill=palette.accent)
        color = palette.on_accent
    else:
        draw.rounded_rectangle(box.rect(), radius=radius, fill=palette.surface, outline=palette.border)
        color = palette.text
    draw.text(((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2), label, font=fnt, fill=color, anchor="mm")


def draw_search_icon(draw: ImageDraw.ImageDraw, cx: int, cy: int, r: int, color: RGB) -> None:
    """A magnifying-glass icon centred at (cx, cy)."""
    draw.ellipse((cx - r, cy - r, cx + r * 0.6, cy + r * 0.6), outline=color, width=2)
    draw.line((cx + r * 0.4, cy + r * 0.4, cx + r, cy + r), fill=color, width=2)


CHROME_STYLES = ("mac", "windows", "plain", "browser", "tabs", "none")


def draw_chrome(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], palette: Palette,
                fonts: Fonts, title: str) -> Box:
    """Window chrome around the screen and the box left for content.

    Styles: a macOS-like title bar, a Windows-like title bar with min/max/close, a bare title bar, a browser
    (tab strip and address bar), an app title bar with a tab row, or no chrome at all.
    """
    style = rng.choices(CHROME_STYLES, weights=(3, 3, 1, 4, 2, 2))[0]
    return draw_chrome_style(draw, rng, style, size, palette, fonts, title)


def draw_chrome_style(draw: ImageDraw.ImageDraw, rng: random.Random, style: str, size: tuple[int, int],
                      palette: Palette, fonts: Fonts, title: str) -> Box:
    """Window chrome of one of CHROME_STYLES around the screen and the box left for content."""
    width, height = size
    if style == "none":
        return Box(0, 0, width, height)
    small = fonts.regular(0.9)
    if style == "browser":
        return _draw_browser(draw, rng, size, palette, small, title)
    bar_h = text_size(small, title)[1] + 14
    draw.rectangle((0, 0, width - 1, bar_h - 1), fill=palette.chrome)
    if style == "mac":
        for i, color in enumerate(((237, 95, 87), (245, 190, 60), (97, 197, 84))):
            cx = 16 + i * 20
            draw.ellipse((cx - 6, bar_h / 2 - 6, cx + 6, bar_h / 2 + 6), fill=color)
        draw.text((width / 2, bar_h / 2), title, font=small, fill=palette.chrome_text, anchor="mm")
    elif style == "windows":
        draw.rectangle((10, bar_h / 2 - 6, 21, bar_h / 2 + 5), fill=palette.accent)
        draw.text((30, bar_h / 2), title, font=small, fill=palette.chrome_text, anchor="lm")
        for i, glyph in enumerate(("✕", "☐", "—")):
            draw.text((width - 22 - i * 44, bar_h / 2), glyph, font=small, fill=palette.chrome_text, anchor="mm")
    else:
        draw.text((12, bar_h / 2), title, font=small, fill=palette.chrome_text, anchor="lm")
    draw.line((0, bar_h - 1, width, bar_h - 1), fill=blend(palette.chrome, (0, 0, 0), 0.15))
    if style != "tabs":
        return Box(0, bar_h, width, height)
    tab_h = bar_h + 4
    draw.rectangle((0, bar_h, width - 1, bar_h + tab_h - 1), fill=palette.surface)
    labels = rng.sample(words.APP_TABS, k=rng.randint(3, 5))
    x = 14
    active = rng.randrange(len(labels))
    for i, label in enumerate(labels):
        label_w = text_size(small, label)[0]
        color = palette.link if i == active else palette.muted
        draw.text((x, bar_h + tab_h / 2), label, font=small, fill=color, anchor="lm")
        if i == active:
            draw.rectangle((x - 4, bar_h + tab_h - 3, x + label_w + 4, bar_h + tab_h - 1), fill=palette.accent)
        x += label_w + 26
    draw.line((0, bar_h + tab_h - 1, width, bar_h + tab_h - 1), fill=palette.border)
    return Box(0, bar_h + tab_h, width, height)


def _draw_browser(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], palette: Palette,
                  small: ImageFont.FreeTypeFont, title: str) -> Box:
    width, height = size
    line_h = text_size(small, "Ag")[1]
    strip_h = line_h + 14
    bar_h = line_h + 18
    strip = blend(palette.chrome, (0, 0, 0), 0.06)
    draw.rectangle((0, 0, width - 1, strip_h + bar_h - 1), fill=strip)
    titles = [title] + rng.sample(words.BROWSER_TABS, k=rng.randint(0, 2))
    tab_w = min(200, (width - 60) // len(titles))
    for i, tab_title in enumerate(titles):
        x0 = 8 + i * tab_w
        if i == 0:
            draw.rounded_rectangle((x0, 5, x0 + tab_w - 4, strip_h + 4), radius=6, fill=palette.chrome)
        else:
            draw.line((x0 + tab_w - 4, 10, x0 + tab_w - 4, strip_h - 4), fill=blend(strip, (0, 0, 0), 0.2))
        label = truncate(small, tab_title, tab_w - 34)
        draw.text((x0 + 10, 5 + (strip_h - 5) / 2), label, font=small, fill=palette.chrome_text, anchor="lm")
        draw.text((x0 + tab_w - 16, 5 + (strip_h - 5) / 2), "×", font=small, fill=palette.chrome_text, anchor="mm")
    draw.rectangle((0, strip_h, width - 1, strip_h + bar_h - 1), fill=palette.chrome)
    cy = strip_h + bar_h / 2
    for i, glyph in enumerate(("←", "→", "↻")):
        draw.text((16 + i * 24, cy), glyph, font=small, fill=palette.chrome_text, anchor="mm")
    field = Box(86, strip_h + 5, width - 14, strip_h + bar_h - 5)
    draw.rounded_rectangle(field.rect(), radius=field.height // 2, fill=blend(palette.chrome, (255, 255, 255), 0.6))
    url = f"https://{rng.choice(words.DOMAINS)}/{rng.choice(words.URL_PATHS)}"
    url_color = (70, 74, 82) if palette.name != "dark" else (40, 42, 48)
    draw.text((field.x0 + 14, cy), truncate(small, url, field.width - 28), font=small, fill=url_color, anchor="lm")
    draw.line((0, strip_h + bar_h - 1, width, strip_h + bar_h - 1), fill=blend(palette.chrome, (0, 0, 0), 0.2))
    return Box(0, strip_h + bar_h, width, height)


def apply_noise(image: Image.Image, rng: random.Random) -> Image.Image:
    """Capture artefacts that keep pixel geometry: JPEG re-encoding, blur, rescaling blur, gaussian noise."""
    if rng.random() < 0.3:
        factor = rng.uniform(0.7, 0.92)
        small = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BILINEAR)
        image = small.resize(image.size, Image.Resampling.BICUBIC)
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.7)))
    if rng.random() < 0.3:
        noise_rng = np.random.default_rng(rng.getrandbits(32))
        pixels = np.asarray(image, dtype=np.float32)
        pixels += noise_rng.normal(0.0, rng.uniform(2.0, 6.0), pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.4:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(45, 85))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image
