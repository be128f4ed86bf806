"""Insurance claim forms: labelled fields (side by side, stacked, two columns or a read-only detail list) and buttons.

Truth: fields [{name, value, box}] in reading order, box being the value's input (or, read-only, its text),
and buttons [{label, box}].
"""

from __future__ import annotations

import random
import string
from datetime import date, timedelta

from PIL import Image, ImageDraw

from training.screens import words
from training.screens.common import Box, Fonts, Palette, Screen, blend, draw_button, draw_text, text_size
from training.screens.styles import MIXED, Look

REQUIRED = ("Claim #", "Date of service", "Amount", "Member ID", "Provider")
OPTIONAL = ("Status", "Diagnosis code", "Patient name", "Policy #", "Procedure code", "Payer")
DATE_FORMATS = ("%m/%d/%Y", "%Y-%m-%d", "%b %d, %Y", "%d.%m.%Y")
# Each set's first label is the primary action.
BUTTONS = (("Submit", "Cancel"), ("Save", "Cancel"), ("Submit claim", "Save draft", "Cancel"), ("Approve", "Deny"),
           ("Save changes", "Discard"), ("Update", "Close", "Print"))
NAV = ("Dashboard", "Claims", "Members", "Providers", "Payments", "Reports", "Settings")


def _digits(rng: random.Random, count: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(count))


def _values(rng: random.Random, names: list[str]) -> dict[str, str]:
    """A consistent set of values (one date format, one amount format) for the named fields."""
    service = date(2022, 1, 1) + timedelta(days=rng.randint(0, 1500))
    amount = rng.randint(1500, 950000) / 100
    claim_formats = (lambda: f"CLM-{_digits(rng, 6)}", lambda: f"C{service.year}-{_digits(rng, 5)}",
                     lambda: _digits(rng, 10), lambda: f"CL{_digits(rng, 7)}")
    member_formats = (lambda: f"MBR-{_digits(rng, 7)}", lambda: f"W{_digits(rng, 9)}",
                      lambda: "".join(rng.choice(string.ascii_uppercase) for _ in range(3)) + _digits(rng, 9))
    makers = {
        "Claim #": rng.choice(claim_formats),
        "Date of service": lambda: service.strftime(rng.choice(DATE_FORMATS)),
        "Amount": lambda: rng.choice(("${:,.2f}", "USD {:,.2f}", "{:.2f}", "$ {:,.2f}")).format(amount),
        "Member ID": rng.choice(member_formats),
        "Provider": lambda: words.doctor_name(rng) if rng.random() < 0.7 else words.clinic_name(rng),
        "Status": lambda: rng.choice(("Pending", "Approved", "Denied", "In review", "Submitted", "Paid")),
        "Diagnosis code": lambda: (rng.choice("EIJKMRZ") + _digits(rng, 2)
                                   + rng.choice(("", "." + _digits(rng, 1), "." + _digits(rng, 3)))),
        "Patient name": lambda: words.person_name(rng),
        "Policy #": lambda: f"POL-{_digits(rng, 5)}-{rng.choice(string.ascii_uppercase)}",
        "Procedure code": lambda: _digits(rng, 5),
        "Payer": lambda: rng.choice(words.PAYERS),
    }
    return {name: makers[name]() for name in names}


class _Metrics:
    """Fonts and row sizes of one attempt at laying the form out."""

    def __init__(self, fonts: Fonts, label_bold: bool, padding: int, gap: int) -> None:
        self.label = fonts.bold(0.9) if label_bold else fonts.regular(0.9)
        self.value = fonts.regular()
        self.heading = fonts.bold(1.35)
        self.button = fonts.regular(0.95)
        self.label_h = text_size(self.label, "Ag")[1]
        self.input_h = text_size(self.value, "Ag")[1] + padding
        self.gap = gap

    def label_width(self, names: list[str], colon: bool) -> int:
        return max(text_size(self.label, name + (":" if colon else ""))[0] for name in names) + 16

    def value_width(self, values: list[str]) -> int:
        return max(text_size(self.value, value)[0] for value in values) + 22

    def fields_height(self, layout: str, count: int) -> int:
        if layout == "side":
            return count * (self.input_h + self.gap)
        if layout == "details":
            return count * (text_size(self.value, "Ag")[1] + 12)
        stacked = self.label_h + 4 + self.input_h + self.gap
        return stacked * (count if layout == "stacked" else -(-count // 2))

    def fits(self, layout: str, names: list[str], values: list[str], area: Box, colon: bool) -> bool:
        height = text_size(self.heading, "Ag")[1] + 18 + self.fields_height(layout, len(names)) + self.input_h + 12
        if height > area.height:
            return False
        if layout == "two-column":
            return (area.width - 24) // 2 >= self.value_width(values)
        if layout == "stacked":
            return area.width >= self.value_width(values)
        return area.width - self.label_width(names, colon) >= self.value_width(values)


def _draw_sidebar(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, palette: Palette,
                  fonts: Fonts) -> Box:
    """A navigation sidebar with 'Claims' active; returns the content box right of it."""
    side = Box(content.x0, content.y0, content.x0 + rng.randint(120, 160), content.y1)
    draw.rectangle(side.rect(), fill=palette.chrome)
    nav_font = fonts.regular(0.95)
    row_h = text_size(nav_font, "Ag")[1] + 14
    y = side.y0 + 12
    for item in NAV:
        if y + row_h > side.y1:
            break
        if item == "Claims":
            draw.rectangle((side.x0, y, side.x1 - 1, y + row_h - 1), fill=blend(palette.chrome, palette.accent, 0.5))
            draw.rectangle((side.x0, y, side.x0 + 3, y + row_h - 1), fill=palette.accent)
        draw.text((side.x0 + 16, y + row_h / 2), item, font=nav_font, fill=palette.chrome_text, anchor="lm")
        y += row_h
    return Box(side.x1, content.y0, content.x1, content.y1)


def _draw_value_input(draw: ImageDraw.ImageDraw, box: Box, value: str, metrics: _Metrics, palette: Palette,
                      readonly: bool) -> None:
    fill = blend(palette.surface, palette.bg, 0.7) if readonly else palette.surface
    draw.rounded_rectangle(box.rect(), radius=4, fill=fill, outline=palette.border)
    draw.text((box.x0 + 9, (box.y0 + box.y1) / 2), value, font=metrics.value, fill=palette.text, anchor="lm")


def generate(rng: random.Random, look: Look = MIXED) -> Screen:
    """A claim-form screen drawn from rng, framed by look (a style family, or today's mix)."""
    size = look.size(rng, portrait_share=0.2)
    palette = look.palette(rng)
    fonts = look.fonts(rng, 11, 14, mono_weight=2)
    names = list(REQUIRED) + rng.sample(OPTIONAL, k=rng.randint(0, 3))
    if rng.random() < 0.6:
        rng.shuffle(names)
    values = _values(rng, names)
    image = Image.new("RGB", size, palette.bg)
    draw = ImageDraw.Draw(image)
    title = rng.choice(("Claims Manager", "ClaimDesk — Edit claim", "Member Portal", "Claim review",
                        "Benefits Administration"))
    content = look.frame(draw, rng, size, palette, fonts, title)
    if content.width >= 620 and rng.random() < 0.4:
        content = _draw_sidebar(draw, rng, content, palette, fonts)
    area = content.inset(rng.randint(14, 28), rng.randint(10, 18))
    layout = rng.choice(("side", "stacked", "two-column", "details"))
    colon = rng.random() < 0.5
    label_bold, padding, gap = rng.random() < 0.3, rng.randint(10, 16), rng.randint(6, 12)
    metrics = _Metrics(fonts, label_bold, padding, gap)
    while fonts.size > 8 and not metrics.fits(layout, names, [values[name] for name in names], area, colon):
        optional = [name for name in names if name not in REQUIRED]
        if optional:
            names.remove(optional[-1])
        elif layout == "stacked":
            layout = "two-column"
        elif layout == "two-column" and padding > 8:
            padding, gap = 8, 5
        else:
            fonts = Fonts(fonts.family, fonts.size - 1)
        metrics = _Metrics(fonts, label_bold, padding, gap)
    values = {name: values[name] for name in names}
    heading = rng.choice(("Claim details", "Edit claim", "Claim summary", "New claim", "Review claim"))
    y = draw_text(draw, (area.x0, area.y0), heading, metrics.heading, palette.text).y1 + 14
    fields = _draw_fields(draw, rng, Box(area.x0, y, area.x1, area.y1), layout, values, metrics, palette, colon)
    buttons = _draw_buttons(draw, rng, area, metrics, palette)
    truth = {
        "layout": layout,
        "fields": [{"name": name, "value": value, "box": box.as_list()} for name, value, box in fields],
        "buttons": [{"label": label, "box": box.as_list()} for label, box in buttons],
    }
    image, style_truth = look.finish(image, rng, palette, fonts)
    return Screen("claim-window", image, {**truth, **style_truth})


def _draw_fields(draw: ImageDraw.ImageDraw, rng: random.Random, area: Box, layout: str, values: dict[str, str],
                 metrics: _Metrics, palette: Palette, colon: bool) -> list[tuple[str, str, Box]]:
    names = list(values)
    suffix = ":" if colon else ""
    readonly = {name for name in ("Claim #", "Member ID") if rng.random() < 0.4}
    value_w = min(area.width, metrics.value_width(list(values.values())) + rng.randint(20, 140))
    fields = []
    if layout == "details":
        row_h = text_size(metrics.value, "Ag")[1] + 12
        label_w = metrics.label_width(names, colon)
        zebra = rng.random() < 0.5
        for i, name in enumerate(names):
            y = area.y0 + i * row_h
            if zebra and i % 2 == 0:
                draw.rectangle((area.x0, y, area.x1 - 1, y + row_h - 1), fill=blend(palette.bg, palette.border, 0.3))
            else:
                draw.line((area.x0, y + row_h - 1, area.x1, y + row_h - 1), fill=blend(palette.bg, palette.border, 0.6))
            draw.text((area.x0 + 6, y + row_h / 2), name + suffix, font=metrics.label, fill=palette.muted, anchor="lm")
            ink = draw_text(draw, (area.x0 + label_w, y + row_h / 2), values[name], metrics.value, palette.text, "lm")
            fields.append((name, values[name], Box(ink.x0 - 2, y + 1, min(ink.x1 + 2, area.x1), y + row_h - 1)))
        return fields
    if layout == "side":
        label_w = metrics.label_width(names, colon)
        right_align = rng.random() < 0.5
        for i, name in enumerate(names):
            y = area.y0 + i * (metrics.input_h + metrics.gap)
            label_x, anchor = (area.x0 + label_w - 10, "rm") if right_align else (area.x0, "lm")
            draw.text((label_x, y + metrics.input_h / 2), name + suffix, font=metrics.label, fill=palette.text,
                      anchor=anchor)
            box = Box(area.x0 + label_w, y, min(area.x1, area.x0 + label_w + value_w), y + metrics.input_h)
            _draw_value_input(draw, box, values[name], metrics, palette, name in readonly)
            fields.append((name, values[name], box))
        return fields
    columns = 1 if layout == "stacked" else 2
    column_w = area.width if columns == 1 else (area.width - 24) // 2
    row_h = metrics.label_h + 4 + metrics.input_h + metrics.gap
    for i, name in enumerate(names):
        row, column = divmod(i, columns)
        x = area.x0 + column * (column_w + 24)
        y = area.y0 + row * row_h
        draw.text((x, y), name + suffix, font=metrics.label, fill=palette.muted)
        box = Box(x, y + metrics.label_h + 4, x + min(column_w, value_w), y + metrics.label_h + 4 + metrics.input_h)
        _draw_value_input(draw, box, values[name], metrics, palette, name in readonly)
        fields.append((name, values[name], box))
    return fields


def _draw_buttons(draw: ImageDraw.ImageDraw, rng: random.Random, area: Box, metrics: _Metrics,
                  palette: Palette) -> list[tuple[str, Box]]:
    """A row of buttons along the bottom of area, the first one primary."""
    labels = rng.choice(BUTTONS)
    primary = labels[0]
    widths = [text_size(metrics.button, label)[0] + 28 for label in labels]
    y1 = area.y1
    y0 = y1 - metrics.input_h
    if rng.random() < 0.6:
        x = area.x1 - sum(widths) - 10 * (len(labels) - 1)
        if rng.random() < 0.5:
            labels, widths = labels[::-1], widths[::-1]
    else:
        x = area.x0
    draw.line((area.x0, y0 - 10, area.x1, y0 - 10), fill=palette.border)
    buttons = []
    for label, width in zip(labels, widths):
        box = Box(x, y0, x + width, y1)
        draw_button(draw, box, label, metrics.button, palette, primary=label == primary)
        buttons.append((label, box))
        x = box.x1 + 10
    return buttons
