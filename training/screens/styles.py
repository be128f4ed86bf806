"""Style families: named sets of rendering choices that every screen generator honours.

    generate("calendar", seed=7, family="mobile")      # a calendar screen in the mobile family's look

A family fixes a screen's frame: the palette themes it draws from, its idiom (a web page in a browser, a
desktop window, a classic bevelled desktop window, a mobile app), fonts (DejaVu families, or STIX, and a scale
of the generator's sizes), the canvas size, clutter around the content (menu bar, toolbar, banner, sidebar,
status bar, a table panel) and overlays drawn over it at the end (a toast, another window). What lies inside
the frame (layouts, fields, providers, days) is the generator's own, drawn from the same rng. A family's screen
records "family" and "overlays" (the boxes drawn over the content, which may hide part of the truth) in its truth.

Families are in-distribution (IN_DISTRIBUTION: looks that today's random mix draws too, except that the mix's
document pages are always paper-coloured; they may be used for training) or held out (HELD_OUT: looks no
training data shows). Held-out families exist to measure how a model copes with styles it never saw: they must
never be used in pre-training or router training, and training.generate_dataset refuses them for training.

Without a family, generators use MIXED: today's random mix of looks with exactly the old draws in the old order,
so every existing seed keeps its bytes (tests/test_styles.py pins them).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image, ImageDraw

from lora_router.configuration import ConfigError
from training.screens.common import (
    ACCENTS,
    CHROME_STYLES,
    FONT_FILES,
    RGB,
    THEMES,
    Box,
    Fonts,
    Palette,
    apply_noise,
    blend,
    draw_chrome,
    draw_chrome_style,
    draw_input,
    draw_search_icon,
    draw_shadowed_panel,
    random_fonts,
    random_palette,
    random_size,
    text_size,
    theme_palette,
    truncate,
)

WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
# Content narrower or shorter than this leaves the generators' layouts no room; clutter that would go below is
# left out.
MIN_CONTENT = (360, 300)


class Look(Protocol):
    """How a generator frames a screen: canvas size, palette, fonts, chrome, and what is drawn last."""

    def size(self, rng: random.Random, portrait_share: float) -> tuple[int, int]: ...

    def palette(self, rng: random.Random) -> Palette: ...

    def fonts(self, rng: random.Random, low: int, high: int, mono_weight: int = 1) -> Fonts: ...

    def frame(self, draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], palette: Palette,
              fonts: Fonts, title: str) -> Box: ...

    def finish(self, image: Image.Image, rng: random.Random, palette: Palette,
               fonts: Fonts) -> tuple[Image.Image, dict]: ...


class MixedLook:
    """Today's random mix of looks, drawn per screen, with exactly the draws the generators made before
    families existed."""

    def size(self, rng: random.Random, portrait_share: float) -> tuple[int, int]:
        return random_size(rng, portrait_share)

    def palette(self, rng: random.Random) -> Palette:
        return random_palette(rng)

    def fonts(self, rng: random.Random, low: int, high: int, mono_weight: int = 1) -> Fonts:
        return random_fonts(rng, low, high, mono_weight)

    def frame(self, draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], palette: Palette,
              fonts: Fonts, title: str) -> Box:
        return draw_chrome(draw, rng, size, palette, fonts, title)

    def finish(self, image: Image.Image, rng: random.Random, palette: Palette,
               fonts: Fonts) -> tuple[Image.Image, dict]:
        """Capture noise; nothing is added to the truth."""
        return apply_noise(image, rng), {}


MIXED = MixedLook()

# ------------------------------------------------------------------------------------------------ palettes

FAMILY_THEMES = (*THEMES, "high-contrast", "classic")


def family_palette(rng: random.Random, theme: str) -> Palette:
    """A palette of one of FAMILY_THEMES: today's themes, a Windows-like high-contrast scheme (black or white),
    or the grey of classic desktop software."""
    if theme in THEMES:
        return theme_palette(rng, theme, rng.choice(ACCENTS))
    if theme == "high-contrast":
        if rng.random() < 0.6:
            accent = rng.choice(((255, 255, 0), (0, 255, 255), (26, 235, 255)))
            return Palette("high-contrast", BLACK, BLACK, WHITE, (230, 230, 230), WHITE, accent, BLACK,
                           (40, 40, 40), accent, BLACK, WHITE)
        accent = rng.choice(((0, 0, 160), (96, 0, 160)))
        return Palette("high-contrast", WHITE, WHITE, BLACK, (20, 20, 20), BLACK, accent, WHITE,
                       (225, 225, 225), (0, 0, 190), WHITE, BLACK)
    grey = rng.choice(((192, 192, 192), (212, 208, 200)))
    return Palette("classic", grey, WHITE, BLACK, (88, 88, 88), (128, 128, 128), (0, 0, 128), WHITE,
                   (198, 214, 236), (0, 0, 200), (0, 0, 128), WHITE)


# ------------------------------------------------------------------------------------------------ idioms

IDIOMS = ("web", "desktop", "classic", "mobile")
# Title-bar chrome of the desktop idiom; the others are the web idiom's or no window at all.
DESKTOP_CHROME = tuple(style for style in CHROME_STYLES if style not in ("browser", "none"))

def _bevel(draw: ImageDraw.ImageDraw, box: Box, raised: bool = True) -> None:
    """A classic 3-D edge: light on the top and left, dark on the bottom and right (reversed when sunken)."""
    light, dark = ((255, 255, 255), (96, 96, 96)) if raised else ((96, 96, 96), (255, 255, 255))
    draw.line((box.x0, box.y1 - 1, box.x0, box.y0, box.x1 - 1, box.y0), fill=light)
    draw.line((box.x0, box.y1 - 1, box.x1 - 1, box.y1 - 1, box.x1 - 1, box.y0), fill=dark)


def _classic_window(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], palette: Palette,
                    fonts: Fonts, title: str) -> Box:
    """A bevelled window with a gradient title bar and drawn minimise/maximise/close buttons."""
    width, height = size
    draw.rectangle((0, 0, width - 1, height - 1), fill=palette.bg)
    _bevel(draw, Box(0, 0, width, height))
    title_font = fonts.bold(0.95)
    bar = Box(4, 4, width - 4, 4 + text_size(title_font, title)[1] + 8)
    end = rng.choice(((16, 132, 208), (166, 202, 240)))
    for x in range(bar.x0, bar.x1):
        draw.line((x, bar.y0, x, bar.y1 - 1), fill=blend(palette.chrome, end, (x - bar.x0) / bar.width))
    draw.rectangle((bar.x0 + 4, bar.y0 + 4, bar.x0 + 13, bar.y1 - 5), fill=palette.bg, outline=WHITE)
    draw.text((bar.x0 + 20, (bar.y0 + bar.y1) / 2), title, font=title_font, fill=palette.chrome_text, anchor="lm")
    side = bar.height - 6
    for i in range(3):
        button = Box(bar.x1 - 3 - (3 - i) * (side + 2), bar.y0 + 3, bar.x1 - 3 - (3 - i) * (side + 2) + side,
                     bar.y1 - 3)
        draw.rectangle(button.rect(), fill=palette.bg)
        _bevel(draw, button)
        inner = button.inset(4)
        if i == 0:
            draw.line((inner.x0, inner.y1 - 1, inner.x1 - 1, inner.y1 - 1), fill=BLACK, width=2)
        elif i == 1:
            draw.rectangle(inner.rect(), outline=BLACK)
            draw.line((inner.x0, inner.y0 + 1, inner.x1 - 1, inner.y0 + 1), fill=BLACK)
        else:
            draw.line((inner.x0, inner.y0, inner.x1 - 1, inner.y1 - 1), fill=BLACK, width=2)
            draw.line((inner.x0, inner.y1 - 1, inner.x1 - 1, inner.y0), fill=BLACK, width=2)
    return Box(4, bar.y1 + 2, width - 4, height - 4)


MOBILE_TABS = ("Home", "Search", "Visits", "Inbox", "Profile")


def _mobile(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], palette: Palette, fonts: Fonts,
            title: str) -> Box:
    """A phone app: status bar, app bar with back arrow and menu, bottom tab bar."""
    width, height = size
    bar_fill = rng.choice((palette.accent, palette.surface, palette.chrome))
    on_bar = palette.on_accent if bar_fill == palette.accent else (
        palette.chrome_text if bar_fill == palette.chrome else palette.text)
    status_h, app_h = 26, text_size(fonts.bold(1.15), title)[1] + 24
    draw.rectangle((0, 0, width - 1, status_h + app_h - 1), fill=bar_fill)
    small = fonts.bold(0.8)
    draw.text((16, status_h / 2), rng.choice(("9:41", "10:08", "14:52")), font=small, fill=on_bar, anchor="lm")
    for i in range(4):
        draw.rectangle((width - 76 + i * 5, status_h - 8 - i * 3, width - 73 + i * 5, status_h - 8), fill=on_bar)
    draw.rectangle((width - 44, 8, width - 20, status_h - 8), outline=on_bar)
    draw.rectangle((width - 42, 10, width - 42 + rng.randint(6, 20), status_h - 10), fill=on_bar)
    cy = status_h + app_h / 2
    draw.text((18, cy), "←", font=fonts.bold(1.3), fill=on_bar, anchor="lm")
    draw.text((52, cy), truncate(fonts.bold(1.15), title, width - 100), font=fonts.bold(1.15), fill=on_bar,
              anchor="lm")
    draw.text((width - 18, cy), "⋮", font=fonts.bold(1.3), fill=on_bar, anchor="rm")
    if bar_fill == palette.surface:
        draw.line((0, status_h + app_h - 1, width, status_h + app_h - 1), fill=palette.border)
    label_font = fonts.regular(0.75)
    nav_h = 30 + text_size(label_font, "Ag")[1]
    nav = Box(0, height - nav_h, width, height)
    draw.rectangle(nav.rect(), fill=palette.surface)
    draw.line((0, nav.y0, width, nav.y0), fill=palette.border)
    tabs = MOBILE_TABS[:rng.randint(3, 5)]
    active = rng.randrange(len(tabs))
    slot = width / len(tabs)
    for i, label in enumerate(tabs):
        color = palette.link if i == active else palette.muted
        cx = slot * i + slot / 2
        draw.rounded_rectangle((cx - 9, nav.y0 + 7, cx + 9, nav.y0 + 23), radius=4, outline=color, width=2)
        draw.text((cx, nav.y0 + 27), label, font=label_font, fill=color, anchor="ma")
    return Box(0, status_h + app_h, width, nav.y0)


def _frame_of(idiom: str) -> Callable[..., Box]:
    """The function that draws an idiom's chrome: (draw, rng, size, palette, fonts, title) -> content box."""
    if idiom == "web":
        return lambda draw, rng, *args: draw_chrome_style(draw, rng, "browser", *args)
    if idiom == "desktop":
        return lambda draw, rng, *args: draw_chrome_style(draw, rng, rng.choice(DESKTOP_CHROME), *args)
    return {"classic": _classic_window, "mobile": _mobile}[idiom]


# ------------------------------------------------------------------------------------------------ clutter

MENU = ("File", "Edit", "View", "Tools", "Window", "Help")
BANNERS = ("Scheduled maintenance Saturday 2–4 AM.", "We use cookies to improve your experience.",
           "Your session expires in 5 minutes.", "New: paperless statements are here.",
           "You have 3 unread messages.")
SIDEBAR = ("Home", "Inbox", "Documents", "Messages", "Billing", "Reports", "Settings", "Help")
STATUS = ("Ready", "Connected", "Saved 2 min ago", "3 items selected", "Syncing…")
ACTIVITY = ("Recent activity", "Audit log", "Queue", "Related records")


def _fits(box: Box) -> bool:
    return box.width >= MIN_CONTENT[0] and box.height >= MIN_CONTENT[1]


def _top_strip(content: Box, height: float) -> tuple[Box, Box] | None:
    """A strip of `height` across the top of content and the rest below it; None when the rest would not fit."""
    strip = Box(content.x0, content.y0, content.x1, content.y0 + height)
    rest = Box(content.x0, strip.y1, content.x1, content.y1)
    return (strip, rest) if _fits(rest) else None


def _menubar(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, palette: Palette,
             fonts: Fonts) -> Box | None:
    """A row of menu names across the top of content."""
    fnt = fonts.regular(0.9)
    split = _top_strip(content, text_size(fnt, "Ag")[1] + 8)
    if split is None:
        return None
    strip, rest = split
    draw.rectangle(strip.rect(), fill=blend(palette.bg, palette.surface, 0.5))
    x = strip.x0 + 8
    for name in MENU[:rng.randint(4, len(MENU))]:
        draw.text((x, (strip.y0 + strip.y1) / 2), name, font=fnt, fill=palette.text, anchor="lm")
        x += text_size(fnt, name)[0] + 16
    draw.line((strip.x0, strip.y1 - 1, strip.x1, strip.y1 - 1), fill=palette.border)
    return rest


def _toolbar(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, palette: Palette,
             fonts: Fonts) -> Box | None:
    """Icon buttons in groups and, where there is room, a search field at the right."""
    split = _top_strip(content, 34)
    if split is None:
        return None
    strip, rest = split
    draw.rectangle(strip.rect(), fill=palette.surface)
    x = strip.x0 + 8
    for group in range(rng.randint(2, 4)):
        for _ in range(rng.randint(2, 4)):
            icon = Box(x, strip.y0 + 6, x + 22, strip.y1 - 6)
            draw.rounded_rectangle(icon.rect(), radius=3, outline=palette.border)
            glyph = icon.inset(6)
            if rng.random() < 0.5:
                draw.rectangle(glyph.rect(), fill=palette.muted)
            else:
                draw.ellipse(glyph.rect(), outline=palette.muted, width=2)
            x = icon.x1 + 4
        draw.line((x + 2, strip.y0 + 8, x + 2, strip.y1 - 8), fill=palette.border)
        x += 8
    if strip.x1 - x > 200:
        field_box = Box(strip.x1 - 170, strip.y0 + 5, strip.x1 - 8, strip.y1 - 5)
        draw_input(draw, field_box, palette)
        draw_search_icon(draw, field_box.x0 + 12, (field_box.y0 + field_box.y1) // 2, 5, palette.muted)
    draw.line((strip.x0, strip.y1 - 1, strip.x1, strip.y1 - 1), fill=palette.border)
    return rest


def _banner(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, palette: Palette,
            fonts: Fonts) -> Box | None:
    """A notice bar with a message, a link and a close mark."""
    fnt = fonts.regular(0.9)
    split = _top_strip(content, text_size(fnt, "Ag")[1] + 14)
    if split is None:
        return None
    strip, rest = split
    warning = rng.random() < 0.5 and palette.name not in ("dark", "high-contrast")
    fill, ink = ((255, 243, 205), (102, 77, 3)) if warning else (palette.tint, palette.text)
    draw.rectangle(strip.rect(), fill=fill)
    cy = (strip.y0 + strip.y1) / 2
    message = truncate(fnt, rng.choice(BANNERS), strip.width - 140)
    draw.text((strip.x0 + 12, cy), message, font=fnt, fill=ink, anchor="lm")
    draw.text((strip.x0 + 24 + text_size(fnt, message)[0], cy), "Learn more", font=fnt, fill=palette.link,
              anchor="lm")
    draw.text((strip.x1 - 14, cy), "×", font=fonts.bold(1.1), fill=ink, anchor="rm")
    return rest


def _sidebar(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, palette: Palette,
             fonts: Fonts) -> Box | None:
    """A navigation column with icons and labels down the left of content."""
    strip = Box(content.x0, content.y0, content.x0 + min(150, max(110, content.width // 5)), content.y1)
    rest = Box(strip.x1, content.y0, content.x1, content.y1)
    if not _fits(rest):
        return None
    draw.rectangle(strip.rect(), fill=blend(palette.bg, palette.chrome, 0.5))
    ink = palette.chrome_text if sum(blend(palette.bg, palette.chrome, 0.5)) < 380 else palette.text
    fnt = fonts.regular(0.85)
    row_h = text_size(fnt, "Ag")[1] + 12
    active = rng.randrange(len(SIDEBAR))
    for i, label in enumerate(SIDEBAR):
        y = strip.y0 + 8 + i * row_h
        if y + row_h > strip.y1:
            break
        if i == active:
            draw.rectangle((strip.x0, y, strip.x1 - 1, y + row_h - 1), fill=blend(palette.chrome, palette.accent, 0.4))
        draw.rectangle((strip.x0 + 12, y + row_h / 2 - 5, strip.x0 + 21, y + row_h / 2 + 4), outline=ink)
        draw.text((strip.x0 + 30, y + row_h / 2), truncate(fnt, label, strip.width - 36), font=fnt, fill=ink,
                  anchor="lm")
    draw.line((strip.x1 - 1, strip.y0, strip.x1 - 1, strip.y1), fill=palette.border)
    return rest


def _statusbar(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, palette: Palette,
               fonts: Fonts) -> Box | None:
    """A status line along the bottom of content."""
    fnt = fonts.regular(0.8)
    strip = Box(content.x0, content.y1 - text_size(fnt, "Ag")[1] - 8, content.x1, content.y1)
    rest = Box(content.x0, content.y0, content.x1, strip.y0)
    if not _fits(rest):
        return None
    draw.rectangle(strip.rect(), fill=palette.chrome)
    cy = (strip.y0 + strip.y1) / 2
    draw.text((strip.x0 + 8, cy), rng.choice(STATUS), font=fnt, fill=palette.chrome_text, anchor="lm")
    draw.text((strip.x1 - 8, cy), f"{rng.choice((75, 100, 125))}%", font=fnt, fill=palette.chrome_text,
              anchor="rm")
    return rest


def _table_panel(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, palette: Palette,
                 fonts: Fonts) -> Box | None:
    """A docked panel of tabular records along the bottom of content (dense, table-heavy software)."""
    fnt, head = fonts.regular(0.8), fonts.bold(0.8)
    row_h = text_size(fnt, "Ag")[1] + 6
    rows = rng.randint(3, 6)
    strip = Box(content.x0, content.y1 - (rows + 2) * row_h - 8, content.x1, content.y1)
    rest = Box(content.x0, content.y0, content.x1, strip.y0)
    if not _fits(rest):
        return None
    draw.rectangle(strip.rect(), fill=palette.surface)
    draw.line((strip.x0, strip.y0, strip.x1, strip.y0), fill=palette.border, width=2)
    draw.text((strip.x0 + 8, strip.y0 + 4), rng.choice(ACTIVITY), font=head, fill=palette.text)
    columns = ("ID", "Date", "User", "Status", "Ref")
    width = (strip.width - 16) // len(columns)
    top = strip.y0 + 4 + row_h
    draw.rectangle((strip.x0 + 8, top, strip.x1 - 9, top + row_h - 1), fill=blend(palette.surface, palette.border, 0.5))
    for c, name in enumerate(columns):
        draw.text((strip.x0 + 12 + c * width, top + row_h / 2), name, font=head, fill=palette.text, anchor="lm")
    for r in range(rows):
        y = top + (r + 1) * row_h
        cells = (f"#{rng.randint(10000, 99999)}", f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}",
                 rng.choice(("jlopez", "wchen", "admin", "apatel", "system")),
                 rng.choice(("Open", "Closed", "Pending", "Done")), f"R-{rng.randint(100, 999)}")
        for c, cell in enumerate(cells):
            draw.text((strip.x0 + 12 + c * width, y + row_h / 2), cell, font=fnt, fill=palette.text, anchor="lm")
        draw.line((strip.x0 + 8, y + row_h - 1, strip.x1 - 9, y + row_h - 1), fill=palette.border)
    return rest


CLUTTER: dict[str, Callable[..., Box | None]] = {
    "menubar": _menubar, "toolbar": _toolbar, "banner": _banner, "sidebar": _sidebar, "statusbar": _statusbar,
    "table": _table_panel,
}

# ------------------------------------------------------------------------------------------------ overlays

TOASTS = (("New message", "Dr. Chen replied to your question."), ("Reminder", "Your visit is tomorrow at 9:30."),
          ("Update available", "Restart to install version 4.2."), ("Upload complete", "2 files were added."))


def _toast(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], palette: Palette,
           fonts: Fonts) -> Box:
    """A notification card in a corner, over whatever is there."""
    width, height = size
    heading, body = rng.choice(TOASTS)
    title_font, body_font = fonts.bold(0.9), fonts.regular(0.85)
    card_w = min(width - 24, max(text_size(body_font, body)[0], text_size(title_font, heading)[0]) + 40)
    card_h = text_size(title_font, heading)[1] + text_size(body_font, body)[1] + 26
    x0 = width - card_w - 12
    y0 = rng.choice((12 + height // 10, height - card_h - 16))
    card = Box(x0, y0, x0 + card_w, y0 + card_h)
    draw_shadowed_panel(draw, card, palette)
    draw.rectangle((card.x0 + 1, card.y0 + 1, card.x0 + 4, card.y1 - 2), fill=palette.accent)
    draw.text((card.x0 + 14, card.y0 + 9), heading, font=title_font, fill=palette.text)
    draw.text((card.x0 + 14, card.y0 + 13 + text_size(title_font, heading)[1]),
              truncate(body_font, body, card_w - 28), font=body_font, fill=palette.muted)
    draw.text((card.x1 - 10, card.y0 + 9), "×", font=title_font, fill=palette.muted, anchor="ra")
    return card


def _window(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], palette: Palette,
            fonts: Fonts) -> Box:
    """Another application's window, partly off the screen's right or bottom edge, with a title bar and text."""
    width, height = size
    win_w, win_h = int(width * rng.uniform(0.3, 0.42)), int(height * rng.uniform(0.35, 0.5))
    if rng.random() < 0.5:
        x0, y0 = width - win_w + rng.randint(20, 60), rng.randint(height // 6, height // 3)
    else:
        x0, y0 = rng.randint(width // 4, width // 2), height - win_h + rng.randint(20, 50)
    window = Box(x0, y0, min(width, x0 + win_w), min(height, y0 + win_h))
    paper = (250, 250, 250) if palette.name != "dark" else (40, 42, 48)
    ink = (30, 30, 30) if palette.name != "dark" else (225, 225, 225)
    draw.rectangle((x0 + 3, y0 + 3, x0 + win_w + 3, y0 + win_h + 3), fill=blend(palette.bg, BLACK, 0.3))
    draw.rectangle((x0, y0, x0 + win_w, y0 + win_h), fill=paper, outline=(90, 90, 90))
    fnt = fonts.regular(0.85)
    bar_h = text_size(fnt, "Ag")[1] + 10
    draw.rectangle((x0, y0, x0 + win_w, y0 + bar_h), fill=rng.choice(((60, 64, 72), (0, 84, 147), (90, 90, 90))))
    draw.text((x0 + 10, y0 + bar_h / 2), rng.choice(("Notes", "Chat", "Untitled — Editor", "Calculator")),
              font=fnt, fill=WHITE, anchor="lm")
    y = y0 + bar_h + 8
    while y + 12 < y0 + win_h:
        draw.line((x0 + 10, y + 6, x0 + 10 + rng.randint(win_w // 3, win_w - 20), y + 6), fill=ink, width=2)
        y += 16
    return window


OVERLAYS: dict[str, Callable[..., Box]] = {"popup": _toast, "window": _window}


# ------------------------------------------------------------------------------------------------ families

@dataclass(frozen=True)
class StyleFamily:
    """One named look: the rendering choices the generators honour for a screen of this family."""

    name: str = field(metadata={"help": "Family name, as --eval-families and generate(..., family=) take it."})
    held_out: bool = field(metadata={
        "help": "Held out: never to be used in pre-training or router training, only to measure."})
    description: str = field(metadata={"help": "What the family looks like, in a few words."})
    themes: tuple[str, ...] = field(metadata={"help": f"Palette themes drawn from: {', '.join(FAMILY_THEMES)}."})
    idiom: str = field(metadata={"help": f"Window chrome: {', '.join(IDIOMS)}."})
    font_families: tuple[str, ...] = field(metadata={"help": "Font families drawn from (common.FONT_FILES)."})
    font_scale: float = field(default=1.0, metadata={"help": "Multiplies the generator's base font size."})
    width: tuple[int, int] = field(default=(480, 800), metadata={"help": "Canvas width range, pixels."})
    height: tuple[int, int] = field(default=(380, 600), metadata={"help": "Canvas height range, pixels."})
    clutter: tuple[str, ...] = field(default=(), metadata={
        "help": f"Drawn around the content, in order, where room is left: {', '.join(CLUTTER)}."})
    overlays: tuple[str, ...] = field(default=(), metadata={
        "help": f"Drawn over the finished content: {', '.join(OVERLAYS)}."})

    def __post_init__(self) -> None:
        choices = (("theme", self.themes, FAMILY_THEMES), ("idiom", (self.idiom,), IDIOMS),
                   ("font family", self.font_families, sorted({name for name, _ in FONT_FILES})),
                   ("clutter", self.clutter, tuple(CLUTTER)), ("overlay", self.overlays, tuple(OVERLAYS)))
        problems = [f"unknown {what} {value!r} (known: {', '.join(known)})"
                    for what, values, known in choices for value in values if value not in known]
        problems += [f"no {what}" for what, values in (("themes", self.themes), ("font families", self.font_families))
                     if not values]
        if not 0.5 <= self.font_scale <= 2:
            problems.append(f"font_scale must be in [0.5, 2], got {self.font_scale}")
        for what, (low, high), least in (("width", self.width, MIN_CONTENT[0]), ("height", self.height, 360)):
            if not least <= low <= high:
                problems.append(f"{what} range must be {least} <= low <= high, got {low}..{high}")
        if problems:
            raise ConfigError(f"style family {self.name!r}: " + "; ".join(problems))

    def size(self, rng: random.Random, portrait_share: float) -> tuple[int, int]:
        """A canvas in the family's ranges; the generator's portrait share is the mix's, not the family's."""
        return rng.randint(*self.width), rng.randint(*self.height)

    def palette(self, rng: random.Random) -> Palette:
        return family_palette(rng, rng.choice(self.themes))

    def fonts(self, rng: random.Random, low: int, high: int, mono_weight: int = 1) -> Fonts:
        """One of the family's font families at the generator's size range times font_scale."""
        return Fonts(rng.choice(self.font_families), max(8, round(rng.randint(low, high) * self.font_scale)))

    def frame(self, draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], palette: Palette,
              fonts: Fonts, title: str) -> Box:
        """The idiom's chrome, then each piece of clutter that leaves the content room; the content box."""
        content = _frame_of(self.idiom)(draw, rng, size, palette, fonts, title)
        for piece in self.clutter:
            content = CLUTTER[piece](draw, rng, content, palette, fonts) or content
        return content

    def finish(self, image: Image.Image, rng: random.Random, palette: Palette,
               fonts: Fonts) -> tuple[Image.Image, dict]:
        """Overlays, then capture noise; the truth gains the family's name and the overlay boxes."""
        draw = ImageDraw.Draw(image)
        covered = [OVERLAYS[name](draw, rng, image.size, palette, fonts) for name in self.overlays]
        return apply_noise(image, rng), {"family": self.name, "overlays": [box.as_list() for box in covered]}


FAMILIES: dict[str, StyleFamily] = {family.name: family for family in (
    # In-distribution: looks today's random mix draws too.
    StyleFamily("web-light", False, "a light web page in a browser", ("light", "coloured"), "web",
                ("sans", "serif"), width=(560, 800), height=(400, 600)),
    StyleFamily("web-dark", False, "a dark web page in a browser", ("dark",), "web", ("sans",),
                width=(560, 800), height=(400, 600)),
    StyleFamily("desktop", False, "a desktop app window with a title bar", ("light", "dark", "coloured"),
                "desktop", ("sans", "serif", "mono")),
    # Held out: never in pre-training or router training.
    StyleFamily("high-contrast", True, "a high-contrast desktop theme: black or white, thick strong colours",
                ("high-contrast",), "desktop", ("sans",), font_scale=1.25, clutter=("toolbar",)),
    StyleFamily("mobile", True, "a phone app in portrait: status bar, app bar, bottom tabs", ("light", "dark"),
                "mobile", ("sans",), font_scale=1.15, width=(360, 430), height=(700, 800)),
    StyleFamily("dense", True, "table-heavy desktop software: small type, menus, toolbar, sidebar, docked table",
                ("light", "coloured"), "desktop", ("sans", "mono"), font_scale=0.8, width=(720, 800),
                height=(520, 600), clutter=("menubar", "toolbar", "sidebar", "statusbar", "table")),
    StyleFamily("classic", True, "bevelled grey 1990s software, a banner, a toast and another window on top",
                ("classic",), "classic", ("stix", "serif"), clutter=("menubar", "banner"),
                overlays=("popup", "window")),
)}
IN_DISTRIBUTION = tuple(name for name, family in FAMILIES.items() if not family.held_out)
HELD_OUT = tuple(name for name, family in FAMILIES.items() if family.held_out)


def style_family(name: str) -> StyleFamily:
    """The family called name; ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown style family {name!r}; in-distribution: {', '.join(IN_DISTRIBUTION)}; "
                         f"held out: {', '.join(HELD_OUT)}")
    return FAMILIES[name]
