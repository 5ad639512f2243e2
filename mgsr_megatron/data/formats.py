"""Instruction JSONL readers: Dolly, Alpaca, prompt/response pairs and chat messages, one prompt template.

Every format is mapped to (instruction, input, response):

    dolly            {"instruction", "context", "response"}
    alpaca           {"instruction", "input", "output"}
    prompt_response  {"prompt", "response"}                 (instruction = prompt, input = "")
    messages         {"messages": [{"role", "content"}, ...]} — the last message must be the assistant's
                     response. With a tokenizer that has a chat template (`chat`), the earlier ones are the
                     prompt `apply_chat_template(messages[:-1], add_generation_prompt=True)` (no
                     prompt_template; Example.chat_templated says its special tokens are in the text);
                     without one they are rendered "role: content" one per line into the instruction,
                     followed by "assistant:".

The prompt is `template.format(instruction=..., input=...)`, where a blank-line-separated block of the
template, or else a single line, whose placeholders all render empty is dropped (so Alpaca rows without
`input` do not get an empty paragraph or line). Optional per-row keys kept as metadata: `family` (task
family, for per-family evaluation) and `references` (extra reference answers for evaluation).

Bad lines raise `UserError` naming file and line; with `skip_bad_lines=True` they are counted instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mgsr_megatron.errors import UserError

FORMATS = ("dolly", "alpaca", "prompt_response", "messages")
# Field names that identify a format (auto-detection) and hold its response.
_RESPONSE_FIELD = {"dolly": "response", "alpaca": "output", "prompt_response": "response", "messages": None}


@dataclass
class Example:
    """One instruction row. `response` is None for prompt-only rows (allowed only with `prompts_only`)."""

    prompt: str
    response: str | None
    source: str  # "file:line", for messages about this row
    family: str = ""
    references: list[str] = field(default_factory=list)
    chat_templated: bool = False  # the prompt is a chat template's rendering: it holds its special tokens


@dataclass
class ReadStats:
    rows: int = 0
    bad_lines: int = 0
    first_bad: str = ""  # the message of the first skipped line, for the log


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "instruction" in row and "context" in row:
        return "dolly"
    if "output" in row or ("instruction" in row and "input" in row):
        return "alpaca"
    if "prompt" in row:
        return "prompt_response"
    if "instruction" in row and "response" in row:
        return "dolly"
    return None


def render_prompt(template: str, instruction: str, input_text: str = "") -> str:
    """Fill the template; a blank-line-separated block, or else a single line, whose placeholders all
    render empty is dropped (Alpaca rows without `input` get no empty paragraph or line)."""
    values = {"instruction": instruction, "input": input_text}

    def is_empty(part: str) -> bool:
        names = re.findall(r"{(\w+)}", part)
        unknown = [n for n in names if n not in values]
        if unknown:
            raise UserError(f"data.prompt_template: unknown placeholder '{{{unknown[0]}}}' "
                            f"(use {{instruction}} and {{input}})")
        return bool(names) and all(not values[n] for n in names)

    blocks = []
    for block in template.split("\n\n"):
        if is_empty(block):
            continue
        lines = [line for line in block.split("\n") if not is_empty(line)]
        blocks.append("\n".join(lines).format(**values))
    return "\n\n".join(blocks)


def _text_field(row: dict, name: str, where: str, required: bool = True) -> str | None:
    if name not in row:
        if required:
            raise UserError(f"{where}: missing field '{name}'")
        return None
    value = row[name]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _render_conversation(history: list[dict], template: str, chat, where: str) -> str:
    """The prompt of a conversation: the tokenizer's chat template (`chat`), else "role: content" lines."""
    if chat is None:
        conversation = "\n".join(f"{m['role']}: {m['content']}" for m in history) + "\nassistant:"
        return render_prompt(template, conversation)
    try:
        return chat(history)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def parse_row(row: dict, fmt: str, template: str, where: str, prompts_only: bool = False, chat=None) -> Example:
    """Map one decoded JSON object to an Example (raises UserError naming `where` and the field).
    `chat(messages) -> prompt text` renders `messages` rows (a tokenizer's `render_chat`), or None."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = detect_format(row)
        if fmt is None:
            raise UserError(f"{where}: cannot tell the format from fields {sorted(row)[:6]} "
                            f"(expected one of {', '.join(FORMATS)}; set data.format)")
    if fmt == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: missing field 'messages' (a non-empty list of {{role, content}})")
        for k, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise UserError(f"{where}: messages[{k}] must have fields 'role' and 'content'")
            if not isinstance(message["content"], str):
                raise UserError(f"{where}: messages[{k}].content must be a string")
        if messages[-1]["role"] == "assistant":
            history, response = messages[:-1], messages[-1]["content"]
        elif prompts_only:
            history, response = messages, None
        else:
            raise UserError(f"{where}: field 'messages': the last message must have role 'assistant'")
        if not history:
            raise UserError(f"{where}: field 'messages' holds no prompt before the assistant's response")
        prompt = _render_conversation(history, template, chat, where)
    else:
        if fmt not in _RESPONSE_FIELD:
            raise UserError(f"data.format: unknown format '{fmt}' (expected auto or one of {', '.join(FORMATS)})")
        instruction_field = "prompt" if fmt == "prompt_response" else "instruction"
        input_field = {"dolly": "context", "alpaca": "input"}.get(fmt)
        instruction = _text_field(row, instruction_field, where)
        input_text = _text_field(row, input_field, where, required=False) if input_field else ""
        response = _text_field(row, _RESPONSE_FIELD[fmt], where, required=not prompts_only)
        prompt = render_prompt(template, instruction, input_text or "")
    if not prompt.strip():
        raise UserError(f"{where}: empty prompt")
    if response is not None and not response.strip():
        raise UserError(f"{where}: empty response in field '{_RESPONSE_FIELD[fmt] or 'messages'}'")
    references = row.get("references", [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise UserError(f"{where}: field 'references' must be a list of strings")
    family = row.get("family", "")
    if not isinstance(family, str):
        raise UserError(f"{where}: field 'family' must be a string")
    return Example(prompt=prompt, response=response, source=where, family=family, references=references,
                   chat_templated=fmt == "messages" and chat is not None)


def iter_json_objects(path: str | Path, *, parse=None, skip_bad_lines: bool = False,
                      stats: ReadStats | None = None):
    """(line number, object) for every non-blank line of a JSONL file, or (line number,
    `parse(object, "file:line")`). A bad line (not UTF-8, not JSON, not a JSON object, or a UserError of
    `parse`) is a one-line UserError naming file and line, unless `skip_bad_lines`: then it is counted
    in `stats` and skipped. Tools that need no format read the objects; read_jsonl parses them."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    with open(path, "rb") as stream:
        for line_number, raw in enumerate(stream, start=1):
            where = f"{path}:{line_number}"
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                    f"{exc.start + 1})") from None
                if not text.strip():
                    continue
                try:
                    row = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
                item = row if parse is None else parse(row, where)
            except UserError as exc:
                if not skip_bad_lines:
                    raise
                stats.bad_lines += 1
                stats.first_bad = stats.first_bad or str(exc)
                continue
            stats.rows += 1
            yield line_number, item


def read_jsonl(path: str | Path, fmt: str = "auto", template: str = "{instruction}\n\n{input}\n\n### Response:\n",
               skip_bad_lines: bool = False, prompts_only: bool = False,
               stats: ReadStats | None = None, chat=None):
    """Yield Examples from a JSONL file. Blank lines are ignored; every other bad line is an error
    (file:line and the reason) unless `skip_bad_lines`, which counts it in `stats` and continues.
    `chat`: how `messages` rows become prompts (`chat_renderer(tokenizer)`; None: "role: content")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"data.format: unknown format '{fmt}' (expected auto or one of {', '.join(FORMATS)})")
    render_prompt(template, "x", "y")  # a bad template is a config error, not a bad line

    def parse(row: dict, where: str) -> Example:
        return parse_row(row, fmt, template, where, prompts_only, chat)

    for _, example in iter_json_objects(path, parse=parse, skip_bad_lines=skip_bad_lines, stats=stats):
        yield example


def chat_renderer(tokenizer):
    """The tokenizer's chat template as `chat` for read_jsonl, or None when it has none."""
    return tokenizer.render_chat if tokenizer is not None and tokenizer.chat_template else None
