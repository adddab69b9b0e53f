"""Turn rows into token ids with prompt masking: column mapping, chat templates, truncation.

A row becomes a *prompt* (a list of chat messages) and a *response* (the assistant's text). The
prompt is rendered with the tokenizer's chat template and ``add_generation_prompt=True``; the
response is the rest of the rendered conversation. Prompt and response are tokenized separately
and concatenated, so the boundary between them is exact and labels never depend on comparing
token ids with the pad id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_tune.data.sources import DataFormatError
from lit_tune.losses import IGNORE_INDEX

KNOWN_ROLES = ("system", "user", "assistant")
# Column pairs detected when no mapping is given, in order of preference.
_PAIR_COLUMNS = (("prompt", "response"), ("question", "answer"), ("prompt", "completion"))


@dataclass
class ColumnMap:
    """Which columns of a row hold the prompt and response, or the chat messages.

    Attributes:
        prompt: Column with the prompt text (e.g. ``"question"``); None to detect.
        response: Column with the response text (e.g. ``"answer"``); None to detect.
        messages: Column with a chat transcript (list of ``{"role", "content"}``); None to detect.
    """

    prompt: str | None = None
    response: str | None = None
    messages: str | None = None

    def resolve(self, row: Mapping[str, Any], where: str) -> ColumnMap:
        """Return a complete mapping for ``row``, detecting the columns that are not set.

        Raises:
            DataFormatError: If the columns are missing; the message lists those found.
        """
        if self.messages or (self.prompt is None and self.response is None and "messages" in row):
            resolved = ColumnMap(messages=self.messages or "messages")
            missing = [resolved.messages] if resolved.messages not in row else []
        elif self.prompt is not None or self.response is not None:
            resolved = ColumnMap(prompt=self.prompt, response=self.response)
            missing = [c for c in (self.prompt, self.response) if c is None or c not in row]
        else:
            pairs = [ColumnMap(p, r) for p, r in _PAIR_COLUMNS if p in row and r in row]
            resolved, missing = (pairs[0], []) if pairs else (self, ["prompt/response"])
        if missing:
            raise DataFormatError(
                f"{where}: missing column(s) {missing}; found {sorted(row)}. Set the column "
                "mapping (prompt_column/response_column, or messages_column) to match."
            )
        return resolved


@dataclass
class FormatStats:
    """Counts of rows changed or dropped while tokenizing, logged after each split is built."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_empty_response: int = 0
    dropped_too_long: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the log."""
        parts = [
            f"{self.kept}/{self.rows} rows kept",
            f"{self.truncated} truncated",
            f"{self.dropped_empty_response} dropped for an empty response",
            f"{self.dropped_too_long} dropped as too long",
        ]
        parts += [f"{count} {name}" for name, count in self.extra.items()]
        return ", ".join(parts)


def _text(row: Mapping[str, Any], column: str, where: str) -> str:
    value = row[column]
    if value is None:
        # `datasets` gives a row that lacks a column present in other rows a null value there.
        raise DataFormatError(
            f"{where}: column {column!r} is missing or null. Add it to that row or remove the row."
        )
    if not isinstance(value, str):
        raise DataFormatError(
            f"{where}: column {column!r} must be a string, got {type(value).__name__} ({value!r:.60})."
        )
    return value


def row_to_messages(
    row: Mapping[str, Any], columns: ColumnMap, where: str, system_prompt: str | None = None
) -> tuple[list[dict[str, str]], str]:
    """Split a row into prompt messages and the final assistant response.

    Args:
        row: One data row.
        columns: Resolved column mapping.
        where: ``"file, row N"`` for error messages.
        system_prompt: Prepended as a system message when the prompt has none.

    Returns:
        ``(prompt_messages, response_text)``.

    Raises:
        DataFormatError: Wrong types, unknown roles, or a transcript not ending in an assistant turn.
    """
    if columns.messages:
        messages = row[columns.messages]
        if not isinstance(messages, list) or not messages:
            raise DataFormatError(f"{where}: column {columns.messages!r} must be a non-empty list of messages.")
        checked = [_check_message(m, where, i) for i, m in enumerate(messages)]
        if checked[-1]["role"] != "assistant":
            raise DataFormatError(
                f"{where}: the last message has role {checked[-1]['role']!r}; SFT needs the "
                "transcript to end with an 'assistant' message, which is the response trained on."
            )
        prompt, response = checked[:-1], checked[-1]["content"]
    else:
        prompt = [{"role": "user", "content": _text(row, columns.prompt, where)}]
        response = _text(row, columns.response, where)
    if system_prompt and prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt, response


def _check_message(message: Any, where: str, index: int) -> dict[str, str]:
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise DataFormatError(f"{where}: message {index} must be an object with 'role' and 'content'.")
    role, content = message["role"], message["content"]
    if role not in KNOWN_ROLES:
        raise DataFormatError(
            f"{where}: message {index} has unknown role {role!r}; expected one of {list(KNOWN_ROLES)}."
        )
    if not isinstance(content, str):
        raise DataFormatError(f"{where}: message {index} content must be a string, got {type(content).__name__}.")
    return {"role": role, "content": content}


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]], use_chat_template: bool = True
) -> list[int]:
    """Tokenize prompt messages, ending where the assistant's answer starts, with one BOS at most."""
    if use_chat_template:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in prompt) + "\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    # Add BOS only when the tokenizer normally adds one and the template did not.
    if bos is not None and _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def encode_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict[str, str]],
    response: str,
    use_chat_template: bool = True,
) -> list[int]:
    """Tokenize the response as the chat template renders it, ending with exactly one EOS.

    Raises:
        DataFormatError: If the chat template renders the prompt differently once the response is
            added, so the response cannot be cut out of the conversation.
    """
    if use_chat_template:
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        conversation = [*prompt, {"role": "assistant", "content": response}]
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        if not full.startswith(head):
            raise DataFormatError(
                "The tokenizer's chat template renders the prompt differently when the assistant "
                "turn is added, so the response cannot be separated. Set use_chat_template=False "
                "or give the tokenizer a template whose generation prompt is a prefix."
            )
        # Trailing whitespace after the end-of-turn token is not trained on.
        text = full[len(head):].rstrip()
    else:
        text = response
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids


def build_example(
    prompt_ids: list[int], response_ids: list[int], *, mask_prompt: bool = True
) -> tuple[list[int], list[int]]:
    """Concatenate prompt and response into ``(input_ids, labels)``.

    Labels are ``IGNORE_INDEX`` on the prompt (when masked) and on position 0, which no position of
    the same sequence predicts; keeping position 0 masked lets packed documents sit side by side
    without one predicting the next.
    """
    input_ids = prompt_ids + response_ids
    if mask_prompt:
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    else:
        labels = list(input_ids)
    labels[0] = IGNORE_INDEX
    return input_ids, labels


__all__ = [
    "KNOWN_ROLES",
    "ColumnMap",
    "FormatStats",
    "build_example",
    "encode_prompt",
    "encode_response",
    "row_to_messages",
]
