"""Provider pickers: a searchable list of cards, a directory table, or an open dropdown under a search input.

Truth: providers [{name, specialty, location, box}] (box = the clickable row), search_box, layout.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from training.screens import words
from training.screens.common import (
    Box,
    Fonts,
    Palette,
    Screen,
    blend,
    draw_search_icon,
    draw_shadowed_panel,
    draw_text,
    text_size,
    truncate,
)
from training.screens.styles import MIXED, Look

AVATAR_COLORS = ((96, 125, 139), (121, 85, 72), (0, 137, 123), (92, 107, 192), (171, 71, 188), (239, 108, 0),
                 (67, 160, 71), (30, 136, 229))


def _providers(rng: random.Random, count: int) -> list[dict]:
    """count providers with distinct names."""
    providers: list[dict] = []
    names: set[str] = set()
    while len(providers) < count:
        name = words.doctor_name(rng) if rng.random() < 0.8 else words.clinic_name(rng)
        if name in names:
            continue
        names.add(name)
        providers.append({"name": name, "specialty": rng.choice(words.SPECIALTIES),
                          "location": rng.choice(words.CITIES)})
    return providers


def _draw_search(draw: ImageDraw.ImageDraw, rng: random.Random, box: Box, palette: Palette, fonts: Fonts,
                 query: str, focused: bool) -> None:
    """A search input with an icon and either a typed query or a placeholder."""
    radius = box.height // 2 if rng.random() < 0.4 else 5
    draw.rounded_rectangle(box.rect(), radius=radius, fill=palette.surface,
                           outline=palette.accent if focused else palette.border, width=2 if focused else 1)
    icon_r = max(4, box.height // 5)
    draw_search_icon(draw, box.x0 + 10 + icon_r, (box.y0 + box.y1) // 2, icon_r, palette.muted)
    text, color = (query, palette.text) if query else (rng.choice(("Search providers…", "Search by name",
                                                                   "Find a doctor", "Type to search")), palette.muted)
    draw.text((box.x0 + 22 + 2 * icon_r, (box.y0 + box.y1) / 2), truncate(fonts.regular(), text, box.width - 50),
              font=fonts.regular(), fill=color, anchor="lm")


def _initials(name: str) -> str:
    parts = [part for part in name.split() if part != "Dr."]
    return (parts[0][0] + parts[-1][0]).upper()


def _list(draw: ImageDraw.ImageDraw, rng: random.Random, area: Box, providers: list[dict], palette: Palette,
          fonts: Fonts) -> list[Box]:
    """Provider cards: avatar, bold name, specialty and location, sometimes a Select button; as many as fit."""
    name_font, detail_font = fonts.bold(), fonts.regular(0.88)
    line_h = text_size(name_font, "Ag")[1]
    card_h = line_h + text_size(detail_font, "Ag")[1] + rng.randint(16, 24)
    gap = rng.choice((0, 6, 8))
    with_button = rng.random() < 0.5
    hovered = rng.randrange(len(providers)) if rng.random() < 0.3 else -1
    boxes = []
    for i, provider in enumerate(providers):
        box = Box(area.x0, area.y0 + i * (card_h + gap), area.x1, area.y0 + i * (card_h + gap) + card_h)
        if box.y1 > area.y1:
            break
        fill = palette.tint if i == hovered else palette.surface
        if gap:
            draw.rounded_rectangle(box.rect(), radius=6, fill=fill, outline=palette.border)
        else:
            draw.rectangle(box.rect(), fill=fill)
            draw.line((box.x0, box.y1 - 1, box.x1 - 1, box.y1 - 1), fill=palette.border)
        radius = min(card_h // 2 - 6, 18)
        cx, cy = box.x0 + 12 + radius, (box.y0 + box.y1) // 2
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=rng.choice(AVATAR_COLORS))
        draw.text((cx, cy), _initials(provider["name"]), font=fonts.bold(0.8), fill=(255, 255, 255), anchor="mm")
        text_x = cx + radius + 12
        right = box.x1 - 12
        if with_button:
            label_w = text_size(detail_font, "Select")[0] + 22
            button = Box(right - label_w, cy - line_h // 2 - 5, right, cy + line_h // 2 + 5)
            draw.rounded_rectangle(button.rect(), radius=4, outline=palette.accent)
            draw.text(((button.x0 + button.x1) / 2, cy), "Select", font=detail_font, fill=palette.link,
                      anchor="mm")
            right = button.x0 - 10
        else:
            draw.text((right, cy), "›", font=fonts.bold(1.3), fill=palette.muted, anchor="rm")
            right -= 20
        name_box = draw_text(draw, (text_x, box.y0 + (card_h - line_h * 2) // 2 - 1), provider["name"], name_font,
                             palette.text)
        details = truncate(detail_font, f"{provider['specialty']} · {provider['location']}", right - text_x)
        draw.text((text_x, name_box.y1 + 4), details, font=detail_font, fill=palette.muted)
        boxes.append(box)
    return boxes


def _table(draw: ImageDraw.ImageDraw, rng: random.Random, area: Box, providers: list[dict], palette: Palette,
           fonts: Fonts) -> list[Box]:
    """A directory table with a header row and zebra or ruled rows; as many rows as fit."""
    cell_font, head_font = fonts.regular(0.95), fonts.bold(0.9)
    columns = [("Name", "name"), ("Specialty", "specialty"), ("Location", "location")]
    accepting = [rng.choice(("Yes", "Yes", "No")) for _ in providers]
    widths = [max(text_size(cell_font, p[key])[0] for p in providers) + 20 for _, key in columns]
    if sum(widths) + 90 <= area.width and rng.random() < 0.6:
        columns.append(("Accepting", "accepting"))
        widths.append(90)
    scale = area.width / sum(widths)
    widths = [int(width * scale) for width in widths]
    row_h = text_size(cell_font, "Ag")[1] + rng.randint(12, 18)
    header = Box(area.x0, area.y0, area.x1, area.y0 + row_h)
    draw.rectangle(header.rect(), fill=blend(palette.surface, palette.border, 0.5))
    zebra = rng.random() < 0.5
    linked_names = rng.random() < 0.3
    x = area.x0
    for (title, _), width in zip(columns, widths):
        draw.text((x + 10, (header.y0 + header.y1) / 2), title, font=head_font, fill=palette.text, anchor="lm")
        x += width
    boxes = []
    for i, provider in enumerate(providers):
        box = Box(area.x0, header.y1 + i * row_h, area.x1, header.y1 + (i + 1) * row_h)
        if box.y1 > area.y1:
            break
        fill = blend(palette.surface, palette.bg, 0.6) if zebra and i % 2 else palette.surface
        draw.rectangle(box.rect(), fill=fill)
        draw.line((box.x0, box.y1 - 1, box.x1 - 1, box.y1 - 1), fill=blend(palette.surface, palette.border, 0.7))
        x = area.x0
        for (_, key), width in zip(columns, widths):
            text = accepting[i] if key == "accepting" else provider[key]
            color = palette.link if key == "name" and linked_names else palette.text
            draw.text((x + 10, (box.y0 + box.y1) / 2), truncate(cell_font, text, width - 16), font=cell_font,
                      fill=color, anchor="lm")
            x += width
        boxes.append(box)
    draw.rectangle((area.x0, area.y0, area.x1 - 1, (boxes[-1].y1 if boxes else header.y1) - 1),
                   outline=palette.border)
    return boxes


def _dropdown(draw: ImageDraw.ImageDraw, rng: random.Random, area: Box, search: Box, providers: list[dict],
              palette: Palette, fonts: Fonts) -> list[Box]:
    """An open dropdown panel under the search input; options show the name and sometimes the specialty."""
    option_font, detail_font = fonts.regular(), fonts.regular(0.85)
    row_h = text_size(option_font, "Ag")[1] + rng.randint(10, 16)
    count = min(len(providers), (area.y1 - search.y1 - 12) // row_h)
    panel = Box(search.x0, search.y1 + 4, search.x1, search.y1 + 4 + count * row_h + 8)
    draw_shadowed_panel(draw, panel, palette, radius=4)
    show_specialty = rng.random() < 0.6
    hovered = rng.randrange(count) if rng.random() < 0.5 else -1
    boxes = []
    for i, provider in enumerate(providers[:count]):
        box = Box(panel.x0 + 1, panel.y0 + 4 + i * row_h, panel.x1 - 1, panel.y0 + 4 + (i + 1) * row_h)
        if i == hovered:
            draw.rectangle(box.rect(), fill=palette.tint)
        cy = (box.y0 + box.y1) / 2
        draw.text((box.x0 + 12, cy), provider["name"], font=option_font, fill=palette.text, anchor="lm")
        if show_specialty:
            name_w = text_size(option_font, provider["name"])[0]
            room = box.width - name_w - 40
            if room > 40:
                draw.text((box.x1 - 12, cy), truncate(detail_font, provider["specialty"], room), font=detail_font,
                          fill=palette.muted, anchor="rm")
        boxes.append(box)
    return boxes


def generate(rng: random.Random, look: Look = MIXED) -> Screen:
    """A provider-selection screen drawn from rng, framed by look (a style family, or today's mix)."""
    size = look.size(rng, portrait_share=0.2)
    palette = look.palette(rng)
    fonts = look.fonts(rng, 11, 14)
    image = Image.new("RGB", size, palette.bg)
    draw = ImageDraw.Draw(image)
    title = rng.choice(("Find a provider", "Provider directory", "Member Portal", "Choose provider",
                        "Referral — select provider"))
    content = look.frame(draw, rng, size, palette, fonts, title)
    area = content.inset(rng.randint(14, 30), rng.randint(10, 18))
    layout = rng.choice(("list", "table", "dropdown"))
    heading = rng.choice(("Select a provider", "Find a doctor", "Choose your provider", "Provider directory",
                          "In-network providers"))
    y = draw_text(draw, (area.x0, area.y0), heading, fonts.bold(1.35), palette.text).y1 + 12
    search_h = text_size(fonts.regular(), "Ag")[1] + 16
    providers = _providers(rng, rng.randint(4, 10))
    if layout == "dropdown":
        label = rng.choice(("Provider", "Referring provider", "Primary care physician", "Choose a provider"))
        y = draw_text(draw, (area.x0, y + 4), label, fonts.regular(0.9), palette.muted).y1 + 6
        search_w = min(area.width, rng.randint(300, 460))
        search = Box(area.x0, y, area.x0 + search_w, y + search_h)
        query = rng.choice(("", "", "Dr", "Dr.", providers[0]["name"][:1]))
        matching = [provider for provider in providers if provider["name"].startswith(query)]
        if len(matching) >= 3:
            providers = matching
        else:
            query = ""
        _draw_search(draw, rng, search, palette, fonts, query, focused=True)
        boxes = _dropdown(draw, rng, area, search, providers, palette, fonts)
    else:
        search_w = area.width if rng.random() < 0.5 else min(area.width, rng.randint(260, 380))
        search = Box(area.x0, y, area.x0 + search_w, y + search_h)
        _draw_search(draw, rng, search, palette, fonts, "", focused=False)
        y = search.y1 + 12
        if rng.random() < 0.4:
            y = _draw_filters(draw, rng, Box(area.x0, y, area.x1, area.y1), palette, fonts) + 10
        region = Box(area.x0, y, area.x1, area.y1)
        boxes = (_list if layout == "list" else _table)(draw, rng, region, providers, palette, fonts)
    truth = {
        "layout": layout,
        "search_box": search.as_list(),
        "providers": [dict(provider, box=box.as_list()) for provider, box in zip(providers, boxes)],
    }
    image, style_truth = look.finish(image, rng, palette, fonts)
    return Screen("provider-select", image, {**truth, **style_truth})


def _draw_filters(draw: ImageDraw.ImageDraw, rng: random.Random, area: Box, palette: Palette, fonts: Fonts) -> int:
    """A row of filter chips ('Specialty ▾', ...); returns the row's bottom."""
    chip_font = fonts.regular(0.85)
    chip_h = text_size(chip_font, "Ag")[1] + 10
    x = area.x0
    for label in rng.sample(("Specialty ▾", "Location ▾", "In network", "Accepting patients", "Distance ▾"), k=3):
        chip_w = text_size(chip_font, label)[0] + 20
        if x + chip_w > area.x1:
            break
        draw.rounded_rectangle((x, area.y0, x + chip_w, area.y0 + chip_h), radius=chip_h // 2,
                               fill=palette.surface, outline=palette.border)
        draw.text((x + chip_w / 2, area.y0 + chip_h / 2), label, font=chip_font, fill=palette.text, anchor="mm")
        x += chip_w + 8
    return area.y0 + chip_h
