"""LLaVA-style JSONL for training: reading and checking lines, rendering them as vLLM will, collating batches.

A line (the seed's format; `training.convert_routing_to_classification` and `training.expert_datasets`
write it):

    {"id": "...", "image": "images/x.jpg",            # or a list of paths; relative to the JSONL's folder
     "conversations": [{"from": "system", "value": "..."},            # optional, first
                       {"from": "human", "value": "<image>\\nQuestion"},
                       {"from": "gpt", "value": "Answer"}]}

Rendering: the human turn becomes an OpenAI-style content list, one image part per `<image>` placeholder (a
newline right after the placeholder is the separator, not text) and text parts in between, so
"<image>\\nQuestion" is `[image, text "Question"]`: the same content a client sends to vLLM. The prompt is the
model's own chat template applied to [system, user] with the generation prompt, expanded by the model's
processor (image tokens); the target is the answer's tokens plus `<|im_end|>`, the only tokens with a loss.

Every line is checked when read; a bad line raises DataError naming FILE:LINE.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_router.jsonl import iter_jsonl
from lora_router.prompts import router_system_prompt

IMAGE_PLACEHOLDER = "<image>"
_PLACEHOLDER_RE = re.compile(r"<image>\n?")
ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
IGNORE_INDEX = -100
_ROUTER_LIST_RE = re.compile(r"Respond with only the adapter name: (.+)\.$")


class DataError(ValueError):
    """A training/eval line that cannot be used; the message starts with FILE:LINE where there is one."""


@dataclass(frozen=True)
class Conversation:
    """One checked line: images, optional system turn, the user's text (with placeholders) and the answer."""

    id: str
    images: tuple[Path, ...]
    system: str | None
    user: str
    answer: str
    metadata: dict = field(default_factory=dict, hash=False, compare=False)
    source: str = ""

    @property
    def user_text(self) -> str:
        """The user's text without image placeholders (what a client sends as the text part)."""
        return "".join(part for kind, part in split_user(self.user) if kind == "text")

    def messages(self, image_part: dict | None = None) -> list[dict]:
        """Chat messages of the prompt (system, user); image parts are `image_part` (default {"type": "image"})."""
        part = image_part or {"type": "image"}
        content = [dict(part) if kind == "image" else {"type": "text", "text": text}
                   for kind, text in split_user(self.user)]
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        return messages + [{"role": "user", "content": content}]


def split_user(value: str) -> list[tuple[str, str]]:
    """("image", "") and ("text", s) parts of a human turn, in order; empty text parts dropped."""
    parts: list[tuple[str, str]] = []
    pieces = _PLACEHOLDER_RE.split(value)
    for i, text in enumerate(pieces):
        if i:
            parts.append(("image", ""))
        if text:
            parts.append(("text", text))
    return parts


def _line_error(path: Path, number: int, message: str) -> DataError:
    return DataError(f"{path}:{number}: {message}")


def parse_line(record: Any, path: Path, number: int, check_images: bool = True) -> Conversation:
    """Check one decoded JSONL record and return it as a Conversation (DataError naming FILE:LINE if bad)."""
    if not isinstance(record, dict):
        raise _line_error(path, number, f"expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _line_error(path, number, "missing or empty 'conversations' list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise _line_error(path, number, f"conversations[{i}] must be {{\"from\": system|human|gpt, "
                                            f"\"value\": string}}, got {json.dumps(turn)[:80]}")
    roles = [turn["from"] for turn in turns]
    system = None
    if roles[0] == "system":
        system = turns[0]["value"]
        turns, roles = turns[1:], roles[1:]
    if "gpt" not in roles:
        raise _line_error(path, number, "conversation has no gpt turn (the answer to learn)")
    if "system" in roles:
        raise _line_error(path, number, "a system turn may only come first")
    if roles != ["human", "gpt"]:
        raise _line_error(path, number, f"expected one human turn then one gpt turn, got {' -> '.join(roles)} "
                                        "(multi-turn conversations are not supported)")
    user, answer = turns[0]["value"], turns[1]["value"]
    if not answer.strip():
        raise _line_error(path, number, "the gpt answer is empty")
    raw_images = record.get("image", record.get("images"))
    if raw_images is None:
        images: list = []
    elif isinstance(raw_images, str):
        images = [raw_images]
    elif isinstance(raw_images, list) and all(isinstance(x, str) for x in raw_images):
        images = raw_images
    else:
        raise _line_error(path, number, "'image' must be a path or a list of paths")
    placeholders = user.count(IMAGE_PLACEHOLDER)
    if placeholders != len(images):
        raise _line_error(path, number, f"the human turn has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
                                        f"but the line has {len(images)} image(s)")
    if any(IMAGE_PLACEHOLDER in turn["value"] for turn in turns[1:]) or (system and IMAGE_PLACEHOLDER in system):
        raise _line_error(path, number, f"{IMAGE_PLACEHOLDER} may only appear in the human turn")
    resolved = tuple(Path(p) if Path(p).is_absolute() else path.parent / p for p in images)
    if check_images:
        for image in resolved:
            if not image.is_file():
                raise _line_error(path, number, f"image file not found: {image}")
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    return Conversation(id=str(record.get("id", f"{path.stem}:{number}")), images=resolved, system=system,
                        user=user, answer=answer, metadata=metadata, source=f"{path}:{number}")


def read_conversations(path: str | Path, check_images: bool = True) -> list[Conversation]:
    """Every non-blank line of a LLaVA JSONL file, checked (DataError naming FILE:LINE on the first bad one)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    out = [parse_line(record, path, number, check_images) for number, record in iter_jsonl(path, DataError)]
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def router_labels(system_prompt: str | None) -> list[str] | None:
    """The labels a router system prompt names (lora_router.prompts' wording), in its order; None if it is not one."""
    if not system_prompt:
        return None
    match = _ROUTER_LIST_RE.search(system_prompt)
    if not match:
        return None
    items = [item.strip() for item in match.group(1).split(", ")]
    if len(items) > 1 and items[-1].startswith("or "):
        items[-1] = items[-1][3:]
    try:
        return items if router_system_prompt(items) == system_prompt else None
    except ValueError:
        return None


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset says about the adapter trained on it."""

    labels: list[str] | None
    system_prompt: str | None
    user_prompt: str | None

    @property
    def is_classification(self) -> bool:
        return self.labels is not None


def describe(conversations: Sequence[Conversation], labels: Sequence[str] | None = None) -> DatasetInfo:
    """Label set (classification data: every line's system prompt is a router prompt naming its answers),
    and the system / user prompts when every line shares them.

    `labels` (the training set's) makes this an eval set of the same classifier: its prompts must name the same
    labels. An answer that is not a label is an "unknown class" DataError naming the line.
    """
    systems = {c.system for c in conversations}
    users = {c.user_text for c in conversations}
    system = systems.pop() if len(systems) == 1 else None
    user = users.pop() if len(users) == 1 else None
    parsed = router_labels(system)
    if parsed is None and any(router_labels(c.system) for c in conversations):
        first = next(c for c in conversations if c.system != conversations[0].system)
        raise DataError(f"{first.source}: router system prompt differs from the first line's; one classifier "
                        "dataset must name one label set")
    if labels is not None:
        if parsed is None:
            raise DataError(f"{conversations[0].source}: eval data of a classifier must use its router prompt "
                            f"naming {', '.join(labels)}")
        if list(parsed) != list(labels):
            raise DataError(f"{conversations[0].source}: the system prompt names labels {parsed}, "
                            f"but the adapter was trained on {list(labels)}")
    if parsed is not None:
        for c in conversations:
            if c.answer not in parsed:
                raise DataError(f"{c.source}: unknown class {c.answer!r} (labels: {', '.join(parsed)})")
    return DatasetInfo(labels=parsed, system_prompt=system, user_prompt=user)


# ----------------------------------------------------------------------------------------------- encoding

def image_kwargs(min_pixels: int | None, max_pixels: int | None) -> dict:
    """Processor keyword arguments for image-size limits (the same `size` vLLM's --mm-processor-kwargs gets)."""
    size = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v}
    return {"size": size} if size else {}


def load_images(conversation: Conversation):
    from PIL import Image

    images = []
    for path in conversation.images:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{conversation.source}: cannot read image {path}: {exc}") from None
    return images


def encode(processor, messages: list[dict], images: list, answer: str | None = None,
           pixel_kwargs: dict | None = None) -> dict:
    """Token ids of one example: the rendered prompt (images expanded), then answer + <|im_end|> if given.

    Returns 1-D tensors input_ids, attention_mask, mm_token_type_ids, labels (-100 on the prompt) and, with
    images, pixel_values and image_grid_thw.
    """
    import torch

    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[prompt], images=images or None, return_tensors="pt", **(pixel_kwargs or {}))
    ids = enc["input_ids"][0]
    mm = enc["mm_token_type_ids"][0] if "mm_token_type_ids" in enc else torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    if answer is not None:
        tok = processor.tokenizer
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        answer_ids = torch.tensor(answer_ids, dtype=ids.dtype)
        ids = torch.cat([ids, answer_ids])
        mm = torch.cat([mm, torch.zeros_like(answer_ids, dtype=mm.dtype)])
        labels = torch.cat([labels, answer_ids])
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm, "labels": labels}
    if images:
        out["pixel_values"] = enc["pixel_values"]
        out["image_grid_thw"] = enc["image_grid_thw"]
    return out


def collate(features: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad a list of encode() outputs into a batch; pixel_values and image_grid_thw are concatenated.

    Other per-token tensors are padded with zeros; per-example scalars are stacked.
    """
    import torch

    longest = max(f["input_ids"].numel() for f in features)
    pads = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
    batch: dict[str, Any] = {}
    for key, value in pads.items():
        rows = []
        for f in features:
            row = f[key]
            fill = torch.full((longest - row.numel(),), value, dtype=row.dtype)
            rows.append(torch.cat([row, fill] if padding_side == "right" else [fill, row]))
        batch[key] = torch.stack(rows)
    for key in features[0]:
        if key in pads or key in ("pixel_values", "image_grid_thw"):
            continue
        values = [f[key] for f in features]
        if values[0].dim() == 0:  # one value per example
            batch[key] = torch.stack(values)
        else:  # one value per token: padded with zeros
            batch[key] = torch.stack([torch.cat([v, v.new_zeros(longest - v.numel())] if padding_side == "right"
                                                else [v.new_zeros(longest - v.numel()), v]) for v in values])
    with_images = [f for f in features if "pixel_values" in f]
    if with_images:
        batch["pixel_values"] = torch.cat([f["pixel_values"] for f in with_images])
        batch["image_grid_thw"] = torch.cat([f["image_grid_thw"] for f in with_images])
    return batch


class ConversationDataset:
    """Map-style dataset: item i is encode() of conversation i, its images read from disk on first use and, within
    `cache_bytes`, kept encoded for the later epochs (reading and preprocessing an image cost about as much CPU as
    the tiny model's training step on it)."""

    def __init__(self, conversations: Sequence[Conversation], processor, pixel_kwargs: dict | None = None,
                 with_answer: bool = True, cache_bytes: int = 0):
        self.conversations = list(conversations)
        self.processor = processor
        self.pixel_kwargs = pixel_kwargs or {}
        self.with_answer = with_answer
        self.cache_bytes = cache_bytes
        self._cache: dict[int, dict] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> dict:
        if index in self._cache:
            return self._cache[index]
        c = self.conversations[index]
        item = encode(self.processor, c.messages(), load_images(c), c.answer if self.with_answer else None,
                      self.pixel_kwargs)
        size = sum(t.numel() * t.element_size() for t in item.values())
        if self._cached_bytes + size <= self.cache_bytes:  # collate copies, so the cached tensors stay as encoded
            self._cache[index] = item
            self._cached_bytes += size
        return item


class Collator:
    """Picklable collate_fn (DataLoader workers) padding with the tokenizer's pad id."""

    def __init__(self, pad_id: int, padding_side: str = "right"):
        self.pad_id = pad_id
        self.padding_side = padding_side

    def __call__(self, features: list[dict]) -> dict:
        return collate(features, self.pad_id, self.padding_side)
