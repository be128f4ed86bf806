"""Calendar screens: month views, popup date pickers over forms, and booking pages with time slots.

Truth: layout (month, picker or booking), year, month (1-12), month_name, highlighted_day, highlight_color (the
fill behind the highlighted day's number), days [{day, box}] (each day's clickable cell) and time_slots
[{label, box}] (possibly empty).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta

from PIL import Image, ImageDraw

from training.screens import words
from training.screens.common import (
    Box,
    Fonts,
    Palette,
    Screen,
    blend,
    draw_button,
    draw_input,
    draw_shadowed_panel,
    draw_text,
    text_size,
    wrap,
)
from training.screens.styles import MIXED, Look

MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
               "November", "December")
WEEKDAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
EVENTS = ("Dentist", "Team sync", "Lab work", "Follow-up", "Payroll", "Check-up", "Review", "Call Ana", "Gym",
          "Standup", "Flight", "Lunch")


def days_in_month(year: int, month: int) -> int:
    """Number of days in the month."""
    following = date(year + month // 12, month % 12 + 1, 1)
    return (following - timedelta(days=1)).day


@dataclass(frozen=True)
class _Month:
    year: int
    month: int
    highlighted: int
    week_start: int  # date.weekday() numbering: 0 Monday, 6 Sunday
    weekday_style: str
    show_adjacent: bool

    @property
    def title(self) -> str:
        return f"{MONTH_NAMES[self.month - 1]} {self.year}"

    @property
    def lead(self) -> int:
        """Blank (or previous-month) cells before the 1st."""
        return (date(self.year, self.month, 1).weekday() - self.week_start) % 7

    @property
    def weeks(self) -> int:
        return -(-(self.lead + days_in_month(self.year, self.month)) // 7)

    def weekday_labels(self) -> list[str]:
        labels = []
        for i in range(7):
            name = WEEKDAY_NAMES[(self.week_start + i) % 7]
            labels.append({"two": name[:2], "three": name[:3], "upper": name[:3].upper(), "letter": name[0]}[
                self.weekday_style])
        return labels

    def adjacent_day(self, cell: int) -> int:
        """The previous or next month's day number shown in a cell outside this month."""
        if cell < self.lead:
            previous = date(self.year, self.month, 1) - timedelta(days=1)
            return previous.day - (self.lead - 1 - cell)
        return cell - self.lead - days_in_month(self.year, self.month) + 1


def _draw_grid(draw: ImageDraw.ImageDraw, rng: random.Random, area: Box, month: _Month, palette: Palette,
               fonts: Fonts, cells: bool) -> list[tuple[int, Box]]:
    """Weekday row and day cells filling area; cells=True draws a bordered month view, else a compact picker.

    Returns each day's cell box.
    """
    small = fonts.regular(0.85)
    head_h = text_size(small, "Mo")[1] + 8
    cell_w = area.width // 7
    cell_h = (area.height - head_h) // month.weeks
    for i, label in enumerate(month.weekday_labels()):
        draw.text((area.x0 + i * cell_w + cell_w / 2, area.y0 + head_h / 2), label, font=small, fill=palette.muted,
                  anchor="mm")
    number_font = fonts.regular() if cells else fonts.regular(0.95)
    chip_font = fonts.regular(0.75)
    number_h = text_size(number_font, "30")[1]
    chip_h = text_size(chip_font, "Ag")[1] + 2
    corner = rng.choice(("left", "right", "center"))
    fill_cell = rng.random() < 0.4
    square = rng.random() < 0.3
    available = not cells and rng.random() < 0.4
    n_days = days_in_month(month.year, month.month)
    boxes = []
    for cell in range(month.weeks * 7):
        row, col = divmod(cell, 7)
        box = Box(area.x0 + col * cell_w, area.y0 + head_h + row * cell_h,
                  area.x0 + (col + 1) * cell_w, area.y0 + head_h + (row + 1) * cell_h)
        day = cell - month.lead + 1
        in_month = 1 <= day <= n_days
        if cells:
            draw.rectangle((box.x0, box.y0, box.x1, box.y1), outline=palette.border,
                           fill=palette.surface if in_month else blend(palette.surface, palette.bg, 0.6))
        if not in_month:
            if month.show_adjacent:
                color = blend(palette.muted, palette.surface, 0.45)
                _draw_day_number(draw, box, month.adjacent_day(cell), number_font, color, cells, corner)
            continue
        highlighted = day == month.highlighted
        color = palette.text
        if highlighted:
            color = palette.on_accent
            if cells and fill_cell:
                draw.rectangle(box.inset(1).rect(), fill=palette.accent)
            else:
                _draw_highlight(draw, box, number_font, day, palette.accent, cells, corner, square)
        elif available and rng.random() < 0.6:
            _draw_highlight(draw, box, number_font, day, palette.tint, cells, corner, square)
            color = palette.link
        _draw_day_number(draw, box, day, number_font, color, cells, corner)
        if cells and box.height >= number_h + chip_h + 14 and rng.random() < 0.22:
            chip = Box(box.x0 + 4, box.y0 + number_h + 9, box.x1 - 4, box.y0 + number_h + 9 + chip_h)
            draw.rounded_rectangle(chip.rect(), radius=3, fill=palette.tint)
            label = rng.choice(EVENTS)
            while label and chip_font.getlength(label) > chip.width - 6:
                label = label[:-1]
            draw.text((chip.x0 + 3, chip.y0 + chip_h / 2), label, font=chip_font, fill=palette.text, anchor="lm")
        boxes.append((day, box))
    return boxes


def _number_anchor(box: Box, fnt, cells: bool, corner: str) -> tuple[tuple[float, float], str]:
    if not cells:
        return ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2), "mm"
    top = box.y0 + 6 + text_size(fnt, "30")[1] / 2
    if corner == "left":
        return (box.x0 + 8, top), "lm"
    if corner == "right":
        return (box.x1 - 8, top), "rm"
    return ((box.x0 + box.x1) / 2, top), "mm"


def _draw_day_number(draw: ImageDraw.ImageDraw, box: Box, day: int, fnt, color, cells: bool, corner: str) -> None:
    xy, anchor = _number_anchor(box, fnt, cells, corner)
    draw.text(xy, str(day), font=fnt, fill=color, anchor=anchor)


def _draw_highlight(draw: ImageDraw.ImageDraw, box: Box, fnt, day: int, color, cells: bool, corner: str,
                    square: bool) -> None:
    """A filled circle or rounded square behind the day's number, kept inside its cell."""
    (x, y), anchor = _number_anchor(box, fnt, cells, corner)
    width, height = text_size(fnt, "30")
    if anchor == "lm":
        x += text_size(fnt, str(day))[0] / 2
    elif anchor == "rm":
        x -= text_size(fnt, str(day))[0] / 2
    if cells:
        radius = min(max(width, height) / 2 + 5, box.width / 2 - 2, box.height / 2 - 2)
    else:
        radius = min(box.width, box.height) / 2 - 2
    x = min(max(x, box.x0 + radius + 1), box.x1 - radius - 2)
    y = min(max(y, box.y0 + radius + 1), box.y1 - radius - 2)
    shape = (x - radius, y - radius, x + radius, y + radius)
    if square:
        draw.rounded_rectangle(shape, radius=radius / 3, fill=color)
    else:
        draw.ellipse(shape, fill=color)


def _draw_month_header(draw: ImageDraw.ImageDraw, area: Box, month: _Month, palette: Palette, fonts: Fonts,
                       style: str) -> int:
    """Month/year header with previous/next arrows across the top of area; returns its height.

    The title shrinks, and the month/year selects become a plain title, where area is too narrow for them.
    """
    height = text_size(fonts.bold(1.1), month.title)[1] + 14
    room = area.width - 56
    title_font = fonts.bold(1.1 * min(1.0, room / text_size(fonts.bold(1.1), month.title)[0]))
    cy = area.y0 + height / 2
    arrows = fonts.bold(1.2)
    select_labels = [label + " ▾" for label in (MONTH_NAMES[month.month - 1], str(month.year))]
    if style == "selects" and sum(text_size(fonts.regular(), label)[0] + 22 for label in select_labels) > room:
        style = "left"
    if style == "center":
        draw.text((area.x0 + 10, cy), "‹", font=arrows, fill=palette.muted, anchor="lm")
        draw.text(((area.x0 + area.x1) / 2, cy), month.title, font=title_font, fill=palette.text, anchor="mm")
        draw.text((area.x1 - 10, cy), "›", font=arrows, fill=palette.muted, anchor="rm")
        return height
    if style == "selects":
        x = area.x0 + 4
        for label in select_labels:
            label_w = text_size(fonts.regular(), label)[0] + 16
            select = Box(x, area.y0 + 3, x + label_w, area.y0 + height - 3)
            draw.rounded_rectangle(select.rect(), radius=4, fill=palette.surface, outline=palette.border)
            draw.text((select.x0 + 8, cy), label, font=fonts.regular(), fill=palette.text, anchor="lm")
            x = select.x1 + 6
    else:
        draw.text((area.x0 + 6, cy), month.title, font=title_font, fill=palette.text, anchor="lm")
    draw.text((area.x1 - 34, cy), "‹", font=arrows, fill=palette.muted, anchor="mm")
    draw.text((area.x1 - 12, cy), "›", font=arrows, fill=palette.muted, anchor="mm")
    return height


def _slot_labels(rng: random.Random, count: int) -> list[str]:
    """Consecutive appointment times, 12-hour ('9:30 AM') or 24-hour ('14:30')."""
    step = rng.choice((15, 20, 30, 45, 60))
    minutes = rng.randint(7, 13) * 60 + rng.choice((0, 30))
    twelve_hour = rng.random() < 0.7
    labels = []
    for _ in range(count):
        hour, minute = divmod(minutes % (24 * 60), 60)
        if twelve_hour:
            labels.append(f"{(hour - 1) % 12 + 1}:{minute:02d} {'AM' if hour < 12 else 'PM'}")
        else:
            labels.append(f"{hour:02d}:{minute:02d}")
        minutes += step
    return labels


def _draw_slots(draw: ImageDraw.ImageDraw, rng: random.Random, area: Box, heading: str, palette: Palette,
                fonts: Fonts) -> list[tuple[str, Box]]:
    """A heading and a column of time-slot buttons in area; as many as fit (none when fewer than two fit)."""
    heading_font = fonts.bold(0.95)
    heading_h = text_size(heading_font, heading)[1] + 10
    button_font = fonts.bold(0.9) if rng.random() < 0.5 else fonts.regular(0.95)
    button_h = text_size(button_font, "9:30 AM")[1] + rng.randint(10, 16)
    gap = rng.randint(5, 9)
    fit = (area.height - heading_h + gap) // (button_h + gap)
    count = min(fit, rng.randint(4, 10))
    if count < 2:
        return []
    draw.text((area.x0, area.y0), heading, font=heading_font, fill=palette.text)
    outlined = rng.random() < 0.6
    slots = []
    for i, label in enumerate(_slot_labels(rng, count)):
        y0 = area.y0 + heading_h + i * (button_h + gap)
        box = Box(area.x0, y0, area.x1, y0 + button_h)
        if outlined:
            draw.rounded_rectangle(box.rect(), radius=5, fill=palette.surface, outline=palette.accent, width=1)
            color = palette.link
        else:
            draw.rounded_rectangle(box.rect(), radius=5, fill=blend(palette.surface, palette.bg, 0.5),
                                   outline=palette.border)
            color = palette.text
        draw.text(((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2), label, font=button_font, fill=color, anchor="mm")
        slots.append((label, box))
    return slots


def _short_date(month: _Month) -> str:
    weekday = WEEKDAY_NAMES[date(month.year, month.month, month.highlighted).weekday()]
    return f"{weekday[:3]}, {MONTH_NAMES[month.month - 1][:3]} {month.highlighted}"


def _month_view(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, month: _Month, palette: Palette,
                fonts: Fonts) -> tuple[list, list]:
    """A calendar app's month view: toolbar, bordered month grid, sometimes an available-times panel."""
    pad = rng.randint(8, 14)
    toolbar_font = fonts.regular(0.9)
    button_h = text_size(toolbar_font, "Today")[1] + 10
    y = content.y0 + pad
    today = Box(content.x0 + pad, y, content.x0 + pad + text_size(toolbar_font, "Today")[0] + 20, y + button_h)
    draw_button(draw, today, "Today", toolbar_font, palette, primary=False)
    arrows = fonts.bold(1.2)
    draw.text((today.x1 + 16, y + button_h / 2), "‹", font=arrows, fill=palette.muted, anchor="mm")
    draw.text((today.x1 + 36, y + button_h / 2), "›", font=arrows, fill=palette.muted, anchor="mm")
    draw.text((today.x1 + 54, y + button_h / 2), month.title, font=fonts.bold(1.3), fill=palette.text, anchor="lm")
    if content.width >= 600:
        views = ("Month", "Week", "Day")
        x = content.x1 - pad
        for view in reversed(views):
            view_w = text_size(toolbar_font, view)[0] + 18
            box = Box(x - view_w, y, x, y + button_h)
            active = view == "Month"
            draw.rectangle(box.rect(), fill=palette.tint if active else palette.surface, outline=palette.border)
            draw.text(((box.x0 + box.x1) / 2, y + button_h / 2), view, font=toolbar_font,
                      fill=palette.link if active else palette.text, anchor="mm")
            x = box.x0
    grid = Box(content.x0 + pad, y + button_h + 10, content.x1 - pad, content.y1 - pad)
    slots: list = []
    if content.width >= 560 and rng.random() < 0.45:
        panel_w = rng.randint(120, 150)
        panel = Box(content.x1 - pad - panel_w, grid.y0, content.x1 - pad, grid.y1)
        slots = _draw_slots(draw, rng, panel, rng.choice(("Available times", _short_date(month))), palette, fonts)
        if slots:
            grid = Box(grid.x0, grid.y0, panel.x0 - 14, grid.y1)
    return _draw_grid(draw, rng, grid, month, palette, fonts, cells=True), slots


def _picker(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, month: _Month, palette: Palette,
            fonts: Fonts) -> tuple[list, list]:
    """A form with a date input whose popup date picker is open, sometimes with a time list beside it.

    The popup drops below the date input; where it would be too small there, the form loses its first field,
    then its buttons, and at last the popup opens beside the input instead.
    """
    card = content.inset(rng.randint(10, 24), rng.randint(8, 16))
    draw.rounded_rectangle(card.rect(), radius=8, fill=palette.surface, outline=palette.border)
    heading = rng.choice(("Book an appointment", "Schedule a visit", "New appointment", "Request time off",
                          "Reschedule visit"))
    heading_box = draw_text(draw, (card.x0 + 18, card.y0 + 14), heading, fonts.bold(1.3), palette.text)
    label_font = fonts.regular(0.85)
    value_font = fonts.regular()
    label_h = text_size(label_font, "Ag")[1]
    input_h = text_size(value_font, "Ag")[1] + 14
    field_h = label_h + 4 + input_h + 12
    popup_extra = text_size(fonts.bold(1.1), "Ag")[1] + 14 + text_size(fonts.regular(0.85), "Mo")[1] + 8 + 16
    top = heading_box.y1 + 14
    fields = [("Patient name", words.person_name(rng)), ("Date", None), ("Reason for visit", "Annual check-up"),
              ("Notes", "")]
    if rng.random() < 0.5:
        fields = fields[1:]
    footer = rng.random() < 0.6

    def cell_below() -> int:
        date_bottom = top + [label for label, _ in fields].index("Date") * field_h + label_h + 4 + input_h
        bottom = card.y1 - 12 - (input_h + 12 if footer else 0)
        return (bottom - date_bottom - 4 - popup_extra) // month.weeks

    if cell_below() < 22 and len(fields) == 4:
        fields = fields[1:]
    if cell_below() < 22:
        footer = False
    beside = cell_below() < 22
    bottom = card.y1 - 12
    if footer:
        button_font = fonts.regular(0.95)
        x = card.x1 - 18
        for label, primary in ((rng.choice(("Book", "Continue", "Save", "Confirm")), True), ("Cancel", False)):
            button_w = text_size(button_font, label)[0] + 28
            draw_button(draw, Box(x - button_w, bottom - input_h, x, bottom), label, button_font, palette, primary)
            x -= button_w + 10
        bottom -= input_h + 12
    column_w = min(rng.randint(170, 200) if beside else rng.randint(210, 300), card.width - 36)
    column = Box(card.x0 + 18, top, card.x0 + 18 + column_w, bottom)
    y = column.y0
    date_input = column
    for label, value in fields:
        if y + label_h + 4 + input_h > column.y1:
            break
        draw.text((column.x0, y), label, font=label_font, fill=palette.muted)
        box = Box(column.x0, y + label_h + 4, column.x1, y + label_h + 4 + input_h)
        draw_input(draw, box, palette, focused=value is None)
        if value is None:
            date_input = box
            value = f"{month.month:02d}/{month.highlighted:02d}/{month.year}"
            icon = Box(box.x1 - 26, box.y0 + 7, box.x1 - 10, box.y1 - 7)
            draw.rectangle(icon.rect(), outline=palette.muted, width=1)
            draw.line((icon.x0, icon.y0 + 4, icon.x1, icon.y0 + 4), fill=palette.muted)
        draw.text((box.x0 + 9, (box.y0 + box.y1) / 2), value, font=value_font, fill=palette.text, anchor="lm")
        y = box.y1 + 12
    x0, popup_top = (column.x1 + 10, column.y0) if beside else (date_input.x0, date_input.y1 + 4)
    cell = max(18, min(36, (bottom - popup_top - popup_extra) // month.weeks, (card.x1 - 18 - x0 - 20) // 7))
    popup = Box(x0, popup_top, x0 + 7 * cell + 20, popup_top + popup_extra + month.weeks * cell)
    draw_shadowed_panel(draw, popup, palette)
    inner = popup.inset(10, 8)
    header = _draw_month_header(draw, inner, month, palette, fonts, rng.choice(("center", "left", "selects")))
    grid = Box(inner.x0, inner.y0 + header, inner.x1, inner.y1)
    days = _draw_grid(draw, rng, grid, month, palette, fonts, cells=False)
    slots: list = []
    slot_x = max(popup.x1, column.x1) + 18
    if card.x1 - 18 - slot_x >= 100 and rng.random() < 0.6:
        area = Box(slot_x, column.y0, min(card.x1 - 18, slot_x + 150), bottom)
        slots = _draw_slots(draw, rng, area, rng.choice(("Time", "Available times", _short_date(month))), palette,
                            fonts)
    return days, slots


def _booking(draw: ImageDraw.ImageDraw, rng: random.Random, content: Box, month: _Month, palette: Palette,
             fonts: Fonts) -> tuple[list, list]:
    """A scheduling page: event details, a month calendar and the chosen day's time slots."""
    card = content.inset(rng.randint(8, 20), rng.randint(8, 16))
    draw.rounded_rectangle(card.rect(), radius=8, fill=palette.surface, outline=palette.border)
    x = card.x0 + 16
    if card.width >= 640:
        info_w = card.width * 26 // 100
        y = card.y0 + 16
        y = draw_text(draw, (x, y), words.doctor_name(rng), fonts.regular(0.9), palette.muted).y1 + 8
        event = rng.choice(("30 Minute Consultation", "Follow-up Visit", "New Patient Intake", "Telehealth Call"))
        for line in wrap(fonts.bold(1.2), event, info_w - 24):
            y = draw_text(draw, (x, y), line, fonts.bold(1.2), palette.text).y1 + 6
        for detail in (f"{rng.choice((15, 30, 45, 60))} min", rng.choice(("Video call", "In person", "Phone call"))):
            y = draw_text(draw, (x, y + 4), "• " + detail, fonts.regular(0.9), palette.muted).y1 + 4
        for line in wrap(fonts.regular(0.85), words.sentence(rng), info_w - 24)[:4]:
            y = draw_text(draw, (x, y + 8), line, fonts.regular(0.85), palette.text).y1
        x = card.x0 + info_w
        draw.line((x, card.y0, x, card.y1 - 1), fill=palette.border)
        x += 16
    title = draw_text(draw, (x, card.y0 + 14), rng.choice(("Select a Date & Time", "Pick a date", "Choose a day")),
                      fonts.bold(1.15), palette.text)
    slot_w = rng.randint(110, 140)
    calendar_x1 = card.x1 - 16 - slot_w - 18
    area = Box(x, title.y1 + 10, calendar_x1, card.y1 - 12)
    header = _draw_month_header(draw, area, month, palette, fonts, rng.choice(("center", "left")))
    weekday_h = text_size(fonts.regular(0.85), "Mo")[1] + 8
    cell = min(44, (area.height - header - weekday_h) // month.weeks, area.width // 7)
    grid = Box(area.x0, area.y0 + header, area.x0 + 7 * cell, area.y0 + header + weekday_h + month.weeks * cell)
    days = _draw_grid(draw, rng, grid, month, palette, fonts, cells=False)
    slot_area = Box(card.x1 - 16 - slot_w, title.y1 + 10, card.x1 - 16, card.y1 - 12)
    weekday = WEEKDAY_NAMES[date(month.year, month.month, month.highlighted).weekday()]
    heading = f"{weekday[:3]}, {MONTH_NAMES[month.month - 1]} {month.highlighted}"
    return days, _draw_slots(draw, rng, slot_area, heading, palette, fonts)


def generate(rng: random.Random, look: Look = MIXED) -> Screen:
    """A calendar screen drawn from rng, framed by look (a style family, or today's mix)."""
    size = look.size(rng, portrait_share=0.1)
    palette = look.palette(rng)
    fonts = look.fonts(rng, 11, 14)
    year, month_number = rng.randint(2023, 2030), rng.randint(1, 12)
    month = _Month(year, month_number, rng.randint(1, days_in_month(year, month_number)), rng.choice((6, 0)),
                   rng.choice(("two", "three", "upper", "letter")), rng.random() < 0.6)
    image = Image.new("RGB", size, palette.bg)
    draw = ImageDraw.Draw(image)
    title = rng.choice(("Calendar", "Appointments", "Book a visit", "Schedule", "Scheduling — CareLink"))
    content = look.frame(draw, rng, size, palette, fonts, title)
    layout = rng.choice(("month", "picker", "booking"))
    draw_layout = {"month": _month_view, "picker": _picker, "booking": _booking}[layout]
    days, slots = draw_layout(draw, rng, content, month, palette, fonts)
    truth = {
        "layout": layout,
        "year": year,
        "month": month_number,
        "month_name": MONTH_NAMES[month_number - 1],
        "highlighted_day": month.highlighted,
        "highlight_color": list(palette.accent),
        "days": [{"day": day, "box": box.as_list()} for day, box in days],
        "time_slots": [{"label": label, "box": box.as_list()} for label, box in slots],
    }
    image, style_truth = look.finish(image, rng, palette, fonts)
    return Screen("calendar", image, {**truth, **style_truth})
