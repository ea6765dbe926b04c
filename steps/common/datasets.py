"""TRL's standard dataset formats: reading data files, telling the format, checking every record.

Formats (https://huggingface.co/docs/trl/dataset_formats), told apart by the first record's fields:
  language_modeling    {"text": str}
  conversational       {"messages": [{"role": ..., "content": str}, ...]}
  prompt_completion    {"prompt", "completion"}: strings, or lists of messages
  preference           {"prompt"?, "chosen", "rejected"}: explicit or implicit prompt
  unpaired_preference  {"prompt", "completion", "label": bool}
  prompt_only          {"prompt"}: a string, or a list of messages (not ending with a system
                       turn); what online methods (PPO, constitutional AI) answer themselves. It
                       has no response, so the stages that learn from or score responses (SFT,
                       distillation, evaluation, quantization) refuse it (`needs_responses`).

Files: .jsonl, .json (a list, or {"data": [...]}), .csv (a header row; message lists as JSON
cells) and .parquet; in a folder, every such file but a stage's manifest.json (data preparation
writes one beside train.jsonl and validation.jsonl). TRL and `datasets` check none of this record
by record, and their errors name neither file nor line, hence this module. Problems read
``<file>:<line>: field '<field>': <what is wrong>``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.common.contract import StageError

ROLES = ("system", "user", "assistant", "tool")
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MANIFEST = "manifest.json"  # what data preparation writes beside its splits
MESSAGE_FIELDS = (
    "messages",
    "prompt",
    "completion",
    "chosen",
    "rejected",
)  # may hold lists of messages


@dataclass(frozen=True)
class Record:
    data: dict[str, Any]
    location: str  # "data/train.jsonl:17", "data/train.json: record 3", "data/train.parquet: row 0"


@dataclass(frozen=True)
class DatasetFormat:
    # language_modeling, conversational, prompt_completion, preference, unpaired_preference,
    # prompt_only
    name: str
    # whether prompt/completion/chosen/rejected hold lists of messages rather than strings
    conversational: bool


# --- Reading --------------------------------------------------------------------------------------


def data_files(path: Path) -> list[Path]:
    """The data files at `path`: the file itself, or every supported file under it, sorted."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise StageError(f"{path}: unsupported file type; use {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    if not path.is_dir():
        raise StageError(f"input {path} does not exist")
    files = []
    for candidate in sorted(p for p in path.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in candidate.relative_to(path).parts):
            continue  # hidden files: .DS_Store, editor swap files, staging folders
        if candidate.name == MANIFEST:
            # Data preparation's (and other stages') description of the folder, not records: a
            # data preparation output folder is read as its train.jsonl and validation.jsonl.
            print(f"skipping {candidate}: a stage's manifest, not data", flush=True)
            continue
        if candidate.suffix.lower() in SUPPORTED_SUFFIXES:
            files.append(candidate)
        else:
            print(
                f"warning: ignoring {candidate}: not one of {', '.join(SUPPORTED_SUFFIXES)}",
                flush=True,
            )
    if not files:
        raise StageError(
            f"input {path} holds no data files; add {', '.join(SUPPORTED_SUFFIXES)} files"
        )
    return files


def read_records(path: Path) -> list[Record]:
    """Every record of one data file, with its location for error messages."""
    path = Path(path)
    display = str(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = _read_parquet(path, display)
    else:
        raw = path.read_bytes()
        if not raw.strip():
            raise StageError(f"{display}: file is empty; remove it or add records")
        text = _decode_utf8(raw, display)
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
        records = reader(text, display)
    if not records:
        raise StageError(f"{display}: no records; remove the file or add records")
    return records


def _decode_utf8(raw: bytes, display: str) -> str:
    try:
        # utf-8-sig: tolerate the byte-order mark that spreadsheet programs write.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise StageError(
            f"{display}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); "
            "re-encode the file as UTF-8"
        ) from None


def _read_jsonl(text: str, display: str) -> list[Record]:
    records = []
    for number, line in enumerate(
        text.split("\n"), start=1
    ):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise StageError(
                f"{display}:{number}: not valid JSON ({err.msg}, column {err.colno}); "
                "each line must be one complete JSON object"
            ) from None
        records.append(Record(value, f"{display}:{number}"))
    return records


def _read_json(text: str, display: str) -> list[Record]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise StageError(
            f"{display}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
        ) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise StageError(
            f'{display}: expected a JSON list of records or {{"data": [...]}}, got {_kind(value)}'
        )
    return [
        Record(item, f"{display}: record {number}") for number, item in enumerate(value, start=1)
    ]


def _read_csv(text: str, display: str) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise StageError(f"{display}: no header row; the first line must name the columns")
    header = [name.strip() for name in header]
    records = []
    line = reader.line_num + 1  # a quoted cell can span lines, so track where each row starts
    for row in reader:
        start, line = line, reader.line_num + 1
        if not row:
            continue
        if len(row) != len(header):
            raise StageError(
                f"{display}:{start}: {len(row)} cells but the header has {len(header)} columns; "
                "quote cells that contain commas"
            )
        location = f"{display}:{start}"
        records.append(
            Record(
                {name: _csv_cell(name, cell, location) for name, cell in zip(header, row)}, location
            )
        )
    return records


def _csv_cell(name: str, cell: str, location: str) -> Any:
    # CSV has only strings: message lists arrive as JSON text, labels as true/false.
    if name == "messages" or (name in MESSAGE_FIELDS and re.match(r"\s*\[\s*\{", cell)):
        try:
            return json.loads(cell)
        except json.JSONDecodeError as err:
            raise StageError(
                f"{location}: field '{name}': not valid JSON ({err.msg}, column {err.colno}); "
                'CSV cells holding messages must be JSON lists like [{"role": "user", ...}]'
            ) from None
    if name == "label" and cell.strip().lower() in ("true", "false", "1", "0"):
        return cell.strip().lower() in ("true", "1")
    return cell


def _read_parquet(path: Path, display: str) -> list[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise StageError(f"{display}: not a readable Parquet file ({err})") from None
    return [Record(row, f"{display}: row {index}") for index, row in enumerate(rows)]


# --- Formats and validation -----------------------------------------------------------------------


def detect_format(record: Record) -> DatasetFormat:
    """The format of a dataset, from the fields of its first record."""
    data = record.data
    if not isinstance(data, dict):
        raise StageError(f"{record.location}: expected a JSON object, got {_kind(data)}")
    keys = set(data)
    if {"chosen", "rejected"} <= keys:
        name, main = "preference", "chosen"
    elif {"prompt", "completion", "label"} <= keys:
        name, main = "unpaired_preference", "completion"
    elif {"prompt", "completion"} <= keys:
        name, main = "prompt_completion", "completion"
    elif "messages" in keys:
        name, main = "conversational", "messages"
    elif "text" in keys:
        name, main = "language_modeling", "text"
    elif "prompt" in keys and not keys & {"completion", "chosen", "rejected", "label"}:
        # A half-written pair ({prompt, chosen}) is not taken for prompts: it is refused below.
        name, main = "prompt_only", "prompt"
    else:
        raise StageError(
            f"{record.location}: cannot tell the dataset format from fields {sorted(keys)}; "
            "expected 'text', 'messages', 'prompt'+'completion', 'chosen'+'rejected' (+'prompt'), "
            "'prompt'+'completion'+'label' or 'prompt' alone"
        )
    return DatasetFormat(name, isinstance(data[main], list))


def validate_records(records: list[Record]) -> DatasetFormat:
    """Check every record against the first one's format; report the first problem and a count."""
    if not records:
        raise StageError("no records to read; add data")
    fmt = detect_format(records[0])
    first_keys = set(records[0].data)
    expected = ", ".join(sorted(first_keys))
    problems = []
    for record in records:
        if not isinstance(record.data, dict):
            problem = f"expected a JSON object, got {_kind(record.data)}"
        elif set(record.data) != first_keys:
            missing = sorted(first_keys - set(record.data))
            extra = sorted(set(record.data) - first_keys)
            problem = (
                f"field '{missing[0]}': missing" if missing else f"field '{extra[0]}': unexpected"
            ) + f"; every record needs the first one's fields: {expected}"
        else:
            problem = record_problem(record.data, fmt)
        if problem:
            problems.append(f"{record.location}: {problem}")
    if problems:
        more = f" ({len(problems) - 1} more records have problems)" if len(problems) > 1 else ""
        raise StageError(problems[0] + more)
    return fmt


def record_problem(data: dict[str, Any], fmt: DatasetFormat) -> str | None:
    """What is wrong with one record of format `fmt`, or None."""
    if fmt.name == "language_modeling":
        return _text_problem(data["text"], "text")
    if fmt.name == "conversational":
        return _messages_problem(data["messages"], "messages", needs_assistant=True)
    if fmt.name == "prompt_only":
        return _response_problem(data["prompt"], "prompt", fmt, is_prompt=True)
    if fmt.name == "preference":
        prompt = data.get("prompt")
        problem = (
            (_response_problem(prompt, "prompt", fmt, is_prompt=True) if "prompt" in data else None)
            or _response_problem(data["chosen"], "chosen", fmt)
            or _response_problem(data["rejected"], "rejected", fmt)
        )
        if problem is None and data["chosen"] == data["rejected"]:
            problem = "fields 'chosen' and 'rejected' are identical; a pair needs two responses"
        return problem
    # prompt_completion and unpaired_preference
    problem = _response_problem(data["prompt"], "prompt", fmt, is_prompt=True) or _response_problem(
        data["completion"], "completion", fmt
    )
    if (
        problem is None
        and fmt.name == "unpaired_preference"
        and not isinstance(data["label"], bool)
    ):
        problem = f"field 'label': expected true or false, got {data['label']!r}"
    return problem


def _response_problem(
    value: Any, field: str, fmt: DatasetFormat, is_prompt: bool = False
) -> str | None:
    if not fmt.conversational:
        if isinstance(value, list):
            return f"field '{field}': expected a string like the first record's, got a list"
        return _text_problem(value, field)
    if isinstance(value, str):
        return f"field '{field}': expected a list of messages like the first record's, got a string"
    return _messages_problem(value, field, needs_assistant=not is_prompt, is_prompt=is_prompt)


def _text_problem(value: Any, field: str) -> str | None:
    if not isinstance(value, str):
        return f"field '{field}': expected a string, got {_kind(value)}"
    if not value.strip():
        return f"field '{field}': empty string; fill it or remove the record"
    return None


def _messages_problem(
    value: Any, field: str, needs_assistant: bool, is_prompt: bool = False
) -> str | None:
    if not isinstance(value, list):
        return f"field '{field}': expected a list of messages, got {_kind(value)}"
    if not value:
        return f"field '{field}': empty list of messages"
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            got = _kind(message)
            return f"field '{where}': expected an object with 'role' and 'content', got {got}"
        if message.get("role") not in ROLES:
            if "role" not in message:
                return f"field '{where}.role': missing"
            expected = ", ".join(ROLES)
            return f"field '{where}.role': unknown role {message['role']!r} (expected {expected})"
        if "content" not in message:
            return f"field '{where}.content': missing"
        problem = _text_problem(message["content"], f"{where}.content")
        if problem:
            return problem
    if needs_assistant and not any(message["role"] == "assistant" for message in value):
        return f"field '{field}': no assistant message; fine-tuning needs one to learn from"
    if is_prompt and value[-1]["role"] == "system":
        last = f"{field}[{len(value) - 1}].role"
        return f"field '{last}': a prompt must end with a user, tool or assistant message"
    return None


def _kind(value: Any) -> str:
    names = {
        str: "a string",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def load_records(path: Path) -> tuple[DatasetFormat, list[Record]]:
    """Read and check every data file at `path` (a file or folder)."""
    records = [record for file in data_files(path) for record in read_records(file)]
    return validate_records(records), records


# --- The prompt a record answers, which a split keeps on one side ---------------------------------


def record_prompt(data: dict[str, Any], fmt: DatasetFormat) -> Any:
    """The prompt a record answers, a string or a list of messages: its `prompt`; for a
    conversation the turns before its last assistant turn; for a preference pair with an implicit
    prompt the start that chosen and rejected share (TRL's extract_prompt). A text document answers
    no prompt: it is its own, so that a document sits on one side of a split."""
    if fmt.name == "language_modeling":
        return data["text"]
    if fmt.name == "conversational":
        return turns_before_answer(data["messages"])
    if "prompt" in data:
        return data["prompt"]
    from trl.data_utils import extract_prompt  # the preference format with an implicit prompt

    return extract_prompt({"chosen": data["chosen"], "rejected": data["rejected"]})["prompt"]


def prompt_key(data: dict[str, Any], fmt: DatasetFormat) -> str:
    """The record's prompt as one normalised string: the same request gives the same key whether
    it is a string or a user turn, with or without a system turn (which changes no request),
    in other spacing, capitals or Unicode forms. Records with one key are held out together."""
    prompt = record_prompt(data, fmt)
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    lines = [f"{turn['role']}: {text}" for turn in turns
             if turn["role"] != "system" and (text := _normalised(turn["content"]))]
    # A conversation that opens with the assistant, or a pair that shares no start: the record
    # itself is its prompt.
    return "\n".join(lines) or json.dumps(data, sort_keys=True, ensure_ascii=False)


def _normalised(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def turns_before_answer(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns before a conversation's last assistant turn: what that answer answers."""
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    return messages[:answers[-1]] if answers else messages


# --- Prompts, for the stages that write their own answers (PPO, constitutional AI) ----------------


def read_prompts(path: Path) -> tuple[DatasetFormat, list[Any]]:
    """The format of the data at `path` (a file or folder) and the prompt of each record, in order.

    Every format with prompts: prompt-only, prompt-completion and unpaired preference (the
    completions are not read), preference (an implicit prompt split off as TRL does) and
    conversations, which may end with the user's turn (a prompt to answer) or with an answer (then
    answered anew from the turn before). Text has no prompts: a StageError, as is a record with none.
    """
    records = [record for file in data_files(path) for record in read_records(file)]
    first = records[0] if records else None
    if first is not None and isinstance(first.data, dict) and "messages" in first.data:
        return DatasetFormat("conversational", True), _conversation_prompts(records)
    fmt = validate_records(records)
    if fmt.name == "language_modeling":
        raise StageError(
            f"{first.location}: 'text' records have no prompt to answer; give records with "
            "'prompt' (a string or messages), 'messages', 'prompt'+'completion' or "
            "'prompt'+'chosen'+'rejected'"
        )
    prompts = [record_prompt(record.data, fmt) for record in records]
    for record, prompt in zip(records, prompts):
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise StageError(f"{record.location}: 'chosen' and 'rejected' share no prompt; give "
                             "the prompt in a 'prompt' field")
    return fmt, prompts


def distinct_prompts(prompts: list[Any]) -> list[Any]:
    """The prompts without repeats, in order of first appearance."""
    return list({json.dumps(prompt, sort_keys=True, ensure_ascii=False): prompt
                 for prompt in prompts}.values())


def _conversation_prompts(records: list[Record]) -> list[Any]:
    prompts, problems = [], []
    for record in records:
        data, prompt, problem = record.data, None, None
        if not isinstance(data, dict):
            problem = f"expected a JSON object, got {_kind(data)}"
        elif "messages" not in data:
            problem = "field 'messages': missing; every record needs the first one's"
        else:
            problem = _messages_problem(data["messages"], "messages", needs_assistant=False)
            if problem is None:
                messages = data["messages"]
                prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
                problem = (
                    "field 'messages': only an assistant turn; a prompt needs a user turn"
                    if not prompt else
                    _messages_problem(prompt, "messages", needs_assistant=False, is_prompt=True)
                )
        if problem:
            problems.append(f"{record.location}: {problem}")
        prompts.append(prompt)
    if problems:
        more = f" ({len(problems) - 1} more records have problems)" if len(problems) > 1 else ""
        raise StageError(problems[0] + more)
    return prompts


# --- What supervised fine-tuning learns from a record ---------------------------------------------


def needs_responses(fmt: DatasetFormat, where: str = "the data") -> None:
    """Refuse prompt-only data in a stage that learns from or scores responses, in one line."""
    if fmt.name == "prompt_only":
        raise StageError(
            f"{where} is prompt-only records ({{'prompt': ...}}); this stage needs responses: "
            "give prompt-completion, conversational, preference or text records (prompt-only "
            "records are for the stages that write their own answers: PPO, constitutional AI)"
        )


def sft_example(
    data: dict[str, Any], fmt: DatasetFormat, chat_template: bool
) -> dict[str, Any] | None:
    """The record in a shape TRL's SFTTrainer trains on: text, messages, or prompt + completion.

    Preference data gives its chosen response (SFT on the chosen answers, the usual step before
    DPO); unpaired preference data its desirable completions only (None for the others). A string
    prompt/completion becomes a one-turn conversation when the tokenizer has a chat template, so an
    instruct model is tuned in the format it is prompted with. Prompt-only data has nothing to
    learn from: a StageError (`needs_responses`).
    """
    needs_responses(fmt)
    if fmt.name == "language_modeling":
        return {"text": data["text"]}
    if fmt.name == "conversational":
        return {"messages": data["messages"]}
    if fmt.name == "unpaired_preference" and not data["label"]:
        return None
    if fmt.name == "preference":
        if "prompt" not in data:  # implicit prompt: the chosen response holds the whole exchange
            return {"messages": data["chosen"]} if fmt.conversational else {"text": data["chosen"]}
        prompt, completion = data["prompt"], data["chosen"]
    else:
        prompt, completion = data["prompt"], data["completion"]
    if not fmt.conversational and chat_template:
        prompt = [{"role": "user", "content": prompt}]
        completion = [{"role": "assistant", "content": completion}]
    return {"prompt": prompt, "completion": completion}
