"""Document pages for OCR: a title, paragraphs, sections, bullet or numbered lists and simple tables.

The page is either the whole screenshot or a page in a viewer (grey surround, icon-only toolbar). Blocks are
added while they fit, so all text is visible. Truth: markdown, exactly the page's text: '#'/'##' headings,
paragraphs on one line each, '- ' and '1. ' list items, pipe tables; blocks separated by a blank line.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from training.screens import words
from training.screens.common import RGB, Box, Fonts, Palette, Screen, apply_noise, random_size, text_size, wrap
from training.screens.styles import MIXED, Look

TABLE_HEADERS = (("Item", "Qty", "Price"), ("Name", "Role", "Phone"), ("Date", "Event", "Location"),
                 ("Code", "Description", "Amount"))


def _table_row(rng: random.Random, header: tuple[str, ...]) -> tuple[str, ...]:
    """Plausible cells under one of TABLE_HEADERS."""
    if header[0] == "Item":
        price = f"${rng.randint(5, 900)}.{rng.choice(('00', '50', '99'))}"
        return rng.choice(words.NOUNS).capitalize(), str(rng.randint(1, 40)), price
    if header[0] == "Name":
        role = rng.choice(("Nurse", "Billing", "Manager", "Physician", "Coordinator"))
        return words.person_name(rng), role, f"555-{rng.randint(1000, 9999)}"
    if header[0] == "Date":
        day = f"{rng.choice(('Jan', 'Mar', 'May', 'Jul', 'Sep', 'Nov'))} {rng.randint(1, 28)}"
        return day, rng.choice(("Kickoff", "Audit", "Training", "Review", "Open house")), rng.choice(words.CITIES)
    description = rng.choice(("Office visit", "Lab panel", "X-ray", "Vaccine"))
    return str(rng.randint(10000, 99999)), description, f"${rng.randint(20, 600)}.00"


@dataclass
class _Block:
    """A laid-out block: its height, its markdown, and how to draw it at (x, y)."""

    height: int
    markdown: str
    draw: Callable[[ImageDraw.ImageDraw, int, int], None]


@dataclass(frozen=True)
class _Style:
    fonts: Fonts
    ink: RGB
    muted: RGB
    rule: RGB
    width: int

    @property
    def body(self) -> ImageFont.FreeTypeFont:
        return self.fonts.regular()

    @property
    def line_h(self) -> int:
        return round(text_size(self.body, "Ag")[1] * 1.3)


def _lines_block(lines: list[str], fnt: ImageFont.FreeTypeFont, color: RGB, line_h: int, markdown: str) -> _Block:
    def draw(d: ImageDraw.ImageDraw, x: int, y: int) -> None:
        for i, line in enumerate(lines):
            d.text((x, y + i * line_h), line, font=fnt, fill=color)

    return _Block(len(lines) * line_h, markdown, draw)


def _heading(text: str, level: int, style: _Style, rule: bool) -> _Block:
    fnt = style.fonts.bold(1.6 if level == 1 else 1.2)
    lines = wrap(fnt, text, style.width)
    line_h = round(text_size(fnt, "Ag")[1] * 1.2)
    block = _lines_block(lines, fnt, style.ink, line_h, "#" * level + " " + text)
    if not rule:
        return block

    def draw(d: ImageDraw.ImageDraw, x: int, y: int) -> None:
        block.draw(d, x, y)
        d.line((x, y + block.height + 2, x + style.width, y + block.height + 2), fill=style.rule, width=1)

    return _Block(block.height + 6, block.markdown, draw)


def _paragraph(rng: random.Random, style: _Style) -> _Block:
    text = " ".join(words.sentence(rng) for _ in range(rng.randint(1, 3)))
    return _lines_block(wrap(style.body, text, style.width), style.body, style.ink, style.line_h, text)


def _list(rng: random.Random, style: _Style, numbered: bool) -> _Block:
    items = [words.task_phrase(rng) + rng.choice(("", "", " by Friday", " for review", " with the team"))
             for _ in range(rng.randint(2, 5))]
    bullet = rng.choice(("•", "–", "▪"))
    markers = [f"{i + 1}." if numbered else bullet for i in range(len(items))]
    indent = text_size(style.body, "10.")[0] + 8
    wrapped = [wrap(style.body, item, style.width - indent - 12) for item in items]

    def draw(d: ImageDraw.ImageDraw, x: int, y: int) -> None:
        for marker, lines in zip(markers, wrapped):
            d.text((x + 6, y), marker, font=style.body, fill=style.ink)
            for line in lines:
                d.text((x + 6 + indent, y), line, font=style.body, fill=style.ink)
                y += style.line_h

    markdown = "\n".join((f"{i + 1}. " if numbered else "- ") + item for i, item in enumerate(items))
    return _Block(sum(len(lines) for lines in wrapped) * style.line_h, markdown, draw)


def _table(rng: random.Random, style: _Style) -> _Block | None:
    """A small table, or None when it is too wide for the page."""
    header = rng.choice(TABLE_HEADERS)
    rows = [_table_row(rng, header) for _ in range(rng.randint(2, 4))]
    head_font = style.fonts.bold(0.95)
    cell_font = style.fonts.regular(0.95)
    widths = [max(text_size(head_font, header[c])[0], *(text_size(cell_font, row[c])[0] for row in rows)) + 20
              for c in range(len(header))]
    if sum(widths) > style.width:
        return None
    row_h = text_size(cell_font, "Ag")[1] + 10
    full_grid = rng.random() < 0.5

    def draw(d: ImageDraw.ImageDraw, x: int, y: int) -> None:
        table_w = sum(widths)
        for r, row in enumerate((header, *rows)):
            top = y + r * row_h
            cx = x
            for c, cell in enumerate(row):
                d.text((cx + 10, top + row_h / 2), cell, font=head_font if r == 0 else cell_font, fill=style.ink,
                       anchor="lm")
                cx += widths[c]
            if full_grid or r <= 1:
                d.line((x, top, x + table_w, top), fill=style.rule)
        bottom = y + (len(rows) + 1) * row_h
        d.line((x, bottom, x + table_w, bottom), fill=style.rule)
        if full_grid:
            cx = x
            for width in (0, *widths):
                cx += width
                d.line((cx, y, cx, bottom), fill=style.rule)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return _Block((len(rows) + 1) * row_h + 1, "\n".join(lines), draw)


def _next_block(rng: random.Random, style: _Style) -> list[_Block]:
    """One content block, or a '##' section heading with the block that follows it."""
    kind = rng.choices(("paragraph", "bullets", "numbered", "table", "section"), weights=(4, 2, 1, 2, 2))[0]
    if kind == "section":
        heading = _heading(rng.choice(words.SECTION_TITLES), 2, style, rule=False)
        body = _paragraph(rng, style) if rng.random() < 0.6 else _list(rng, style, numbered=False)
        return [heading, body]
    if kind == "table":
        table = _table(rng, style)
        return [table] if table else [_paragraph(rng, style)]
    if kind == "paragraph":
        return [_paragraph(rng, style)]
    return [_list(rng, style, numbered=kind == "numbered")]


def _is_list(markdown: str) -> bool:
    return markdown.startswith(("- ", "1. "))


def _draw_viewer(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int]) -> Box:
    """A document viewer's grey surround and icon-only toolbar; returns the page box."""
    width, height = size
    dark = rng.random() < 0.5
    surround = (72, 75, 80) if dark else (214, 216, 220)
    bar = (50, 53, 58) if dark else (240, 241, 243)
    icon = (200, 203, 208) if dark else (90, 94, 100)
    draw.rectangle((0, 0, width - 1, height - 1), fill=surround)
    draw.rectangle((0, 0, width - 1, 35), fill=bar)
    for i in range(3):
        draw.line((12, 11 + i * 6, 28, 11 + i * 6), fill=icon, width=2)
    for i, x in enumerate((width // 2 - 40, width // 2 + 24)):
        draw.line((x, 18, x + 14, 18), fill=icon, width=2)
        if i == 1:
            draw.line((x + 7, 11, x + 7, 25), fill=icon, width=2)
    draw.rectangle((width - 30, 10, width - 14, 26), outline=icon, width=2)
    margin = rng.randint(16, max(18, width // 8))
    return Box(margin, 36 + rng.randint(10, 20), width - margin, height + 40)


def _todays_page(rng: random.Random) -> tuple[Image.Image, Box, _Style]:
    """Today's page: paper and ink of its own, the whole screenshot or a page in a viewer."""
    size = random_size(rng, portrait_share=0.5)
    paper = rng.choice(((255, 255, 255), (252, 251, 247), (248, 246, 240)))
    image = Image.new("RGB", size, paper)
    draw = ImageDraw.Draw(image)
    page = Box(0, 0, size[0], size[1])
    if rng.random() < 0.4:
        page = _draw_viewer(draw, rng, size)
        draw.rectangle((page.x0 + 3, page.y0 + 3, page.x1 + 2, page.y1), fill=(60, 60, 60))
        draw.rectangle(page.rect(), fill=paper)
    margin_x, margin_y = rng.randint(20, 44), rng.randint(18, 36)
    text = Box(page.x0 + margin_x, page.y0 + margin_y, page.x1 - margin_x, min(page.y1, size[1]) - margin_y)
    ink = rng.choice(((20, 20, 24), (35, 38, 45), (10, 25, 60)))
    fonts = Fonts(rng.choices(("serif", "sans", "mono"), weights=(5, 4, 1))[0], rng.randint(12, 15))
    return image, text, _Style(fonts, ink, (110, 112, 118), (150, 152, 158), text.width)


def _family_page(rng: random.Random, look: Look) -> tuple[Image.Image, Box, _Style, Palette]:
    """A page in a style family's frame, on its palette's surface in its text colour."""
    size = look.size(rng, portrait_share=0.5)
    palette = look.palette(rng)
    fonts = look.fonts(rng, 12, 15)
    image = Image.new("RGB", size, palette.bg)
    draw = ImageDraw.Draw(image)
    title = rng.choice(("Document viewer", "Shared document", "Preview", "Reader"))
    page = look.frame(draw, rng, size, palette, fonts, title)
    draw.rectangle(page.rect(), fill=palette.surface)
    text = page.inset(rng.randint(20, 44), rng.randint(18, 36))
    return image, text, _Style(fonts, palette.text, palette.muted, palette.border, text.width), palette


def _write_page(rng: random.Random, draw: ImageDraw.ImageDraw, text: Box, style: _Style) -> str:
    """Blocks in text while they fit, and sometimes a page footer; returns the page's markdown."""
    gap = style.line_h // 2 + rng.randint(2, 6)
    footer = f"Page {rng.randint(1, 3)} of {rng.randint(3, 9)}" if rng.random() < 0.3 else ""
    bottom = text.y1 - (style.line_h + gap if footer else 0)
    blocks = [_heading(rng.choice(words.TITLE_WORDS), 1, style, rule=rng.random() < 0.4)]
    if rng.random() < 0.4:
        byline = f"Prepared by {words.person_name(rng)}"
        blocks.append(_lines_block([byline], style.fonts.regular(0.9), style.muted, style.line_h, byline))
    y = text.y0
    markdown: list[str] = []
    misses = 0
    while misses < 3 and len(markdown) < 9:
        group = blocks or _next_block(rng, style)
        blocks = []
        height = sum(block.height for block in group) + gap * len(group)
        # Two lists in a row would read as one list in markdown.
        if y + height > bottom or (markdown and _is_list(markdown[-1]) and _is_list(group[0].markdown)):
            misses += 1
            continue
        for block in group:
            block.draw(draw, text.x0, y)
            markdown.append(block.markdown)
            y += block.height + gap
    if footer:
        draw.text(((text.x0 + text.x1) / 2, text.y1 - style.line_h / 2), footer, font=style.fonts.regular(0.85),
                  fill=style.muted, anchor="mm")
        markdown.append(footer)
    return "\n\n".join(markdown)


def generate(rng: random.Random, look: Look = MIXED) -> Screen:
    """A document page drawn from rng, in today's look or framed by a style family."""
    # Today's pages keep their own paper, ink, viewer and draws; only a family dresses the page in a palette.
    if look is MIXED:
        image, text, style = _todays_page(rng)
        markdown = _write_page(rng, ImageDraw.Draw(image), text, style)
        return Screen("chandra-ocr", apply_noise(image, rng), {"markdown": markdown})
    image, text, style, palette = _family_page(rng, look)
    markdown = _write_page(rng, ImageDraw.Draw(image), text, style)
    image, style_truth = look.finish(image, rng, palette, style.fonts)
    return Screen("chandra-ocr", image, {"markdown": markdown, **style_truth})
