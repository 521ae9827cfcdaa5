"""Prompt families per checkpoint, and prompts built at the token level, document first.

Three families (issue 10):
- "completion": StoryWriter and base MPT-7B, trained on plain text: the document, then a cue the
  model completes ("Summary of the document above ...:").
- "instruct": MPT-7B-Instruct (dolly-style): "### Instruction:" ... "### Response:".
- "chat": MPT-7B-Chat: ChatML (<|im_start|>role ... <|im_end|>).

Detection rule (detect_family): the checkpoint's name (the last component of a hub id or a local
path, the repo of a hub cache dir "models--org--name", and the `_name_or_path` in a local
checkpoint's config.json) split into words: a word "chat" -> chat, else a word "instruct" ->
instruct, else completion. An explicit family (the
`prompt_family` setting, carried on the engine object) wins over detection.

Every prompt is head + context + task suffix, each tokenized on its own and concatenated as ids, so
the head + document ids are the same for every task of one document (summary, each question, the
classification labels) and the serving engine shares their KV blocks.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

FAMILIES = ("completion", "instruct", "chat")
PROMPT_FAMILY_SETTINGS = ("auto", *FAMILIES)

INSTRUCT_INTRO = ("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.\n")
CHAT_SYSTEM = ("You are a careful assistant. You answer from the document the user gives you, "
               "accurately and concisely, and say so when the document does not contain the answer.")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TaskText:
    """One task's wording: `instruction` for instruct/chat models, `cue` for completion models (the
    text the answer continues; it ends where the answer starts)."""

    instruction: str
    cue: str


@dataclass(frozen=True)
class Family:
    name: str
    head: str  # before the context (document)
    before_task: str  # between the context and the task text
    after_task: str  # after an instruction: where the response starts (unused by completion)
    stop: tuple[str, ...]  # stop strings for free generation in this format
    end_of_answer: str | None  # text the model writes after a finished answer; None = end-of-text

    def task_text(self, task: TaskText) -> str:
        if self.name == "completion":
            return self.before_task + task.cue
        return self.before_task + task.instruction + self.after_task

    def answer_lead(self, task: TaskText) -> str:
        """What precedes a short answer (a label): a space after "Answer:", nothing after a newline."""
        text = self.task_text(task)
        return "" if text.endswith(("\n", " ")) else " "


FAMILY_SPECS: dict[str, Family] = {
    "completion": Family("completion", head="", before_task="\n\n", after_task="",
                         stop=("\n\n\n", "\n---", "\nQuestion:"), end_of_answer="\n"),
    "instruct": Family("instruct", head=INSTRUCT_INTRO + "### Instruction:\nRead this document:\n\n",
                       before_task="\n\n", after_task="\n### Response:\n",
                       stop=("### Instruction", "### Response", "\n\n\n"), end_of_answer=None),
    "chat": Family("chat", head=f"{IM_START}system\n{CHAT_SYSTEM}{IM_END}\n{IM_START}user\nDocument:\n\n",
                   before_task="\n\n", after_task=f"{IM_END}\n{IM_START}assistant\n",
                   stop=(IM_END, IM_START), end_of_answer=IM_END),
}

_WORD = re.compile(r"[a-z0-9]+")


def _name_words(name: str) -> set[str]:
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    # a hub cache dir (.../models--mosaicml--mpt-7b-chat/snapshots/<hash>) is named by its repo
    cached = [p.rsplit("--", 1)[-1] for p in parts if p.startswith("models--")]
    base = cached[-1] if cached else (parts[-1] if parts else "")  # hub "org/name" or a path's last part
    return set(_WORD.findall(base.lower()))


def detect_family(model_name: str) -> str:
    """The family for a checkpoint name or local checkpoint dir (the rule in the module docstring)."""
    names = [model_name]
    config = Path(model_name).expanduser() / "config.json"
    if config.is_file():
        try:
            raw: Any = json.loads(config.read_text())
            if isinstance(raw, dict) and isinstance(raw.get("_name_or_path"), str):
                names.append(raw["_name_or_path"])
        except (OSError, ValueError) as exc:  # an unreadable config just means "decide by the name"
            log.debug("could not read %s: %s", config, exc)
    words = set().union(*(_name_words(n) for n in names))
    if "chat" in words:
        return "chat"
    if "instruct" in words:
        return "instruct"
    return "completion"


def resolve_family(model_name: str, override: str | None = None) -> Family:
    """The family named by `override` ("completion" | "instruct" | "chat"), else the detected one."""
    if override and override != "auto":
        if override not in FAMILY_SPECS:
            raise ValueError(f"prompt family must be one of {', '.join(PROMPT_FAMILY_SETTINGS)}, not {override!r}")
        return FAMILY_SPECS[override]
    return FAMILY_SPECS[detect_family(model_name)]


class _DocumentIds:
    """The last few documents' ids per (tokenizer, text), each computed once even when several tasks
    of one document (separate threads) ask at the same moment: the first computes, the others wait
    for it (an lru_cache lets all of them miss and tokenize the same 14K-65K-token text at once)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[TokenizerLike, str], Future] = OrderedDict()

    def get(self, tokenizer: TokenizerLike, text: str) -> tuple[int, ...]:
        key = (tokenizer, text)
        with self._lock:
            future = self._entries.get(key)
            owner = future is None
            if future is None:
                future = self._entries[key] = Future()
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
        if owner:
            try:
                future.set_result(tuple(tokenizer.encode(text)))
            except BaseException as exc:  # the waiters see the same error; the next caller tries again
                with self._lock:
                    if self._entries.get(key) is future:
                        del self._entries[key]
                future.set_exception(exc)
        return future.result()


_DOCUMENT_IDS = _DocumentIds(size=8)


def encode(tokenizer: TokenizerLike, text: str) -> list[int]:
    return tokenizer.encode(text) if text else []


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    prefix_len: int  # head + context: the part shared by every task on the same context


class PromptBuilder:
    """Token-level prompts for one tokenizer and family: ids = head + context + task suffix."""

    def __init__(self, tokenizer: TokenizerLike, family: Family, eos_id: int | None = None) -> None:
        self.tokenizer, self.family, self.eos_id = tokenizer, family, eos_id
        self.head_ids = encode(tokenizer, family.head)
        self.separator_ids = encode(tokenizer, "\n\n[...]\n\n")  # between non-adjacent passages
        # ChatML's markers are special tokens in MPT-7B-Chat's tokenizer: decoding skips them, so a stop
        # *string* never sees <|im_end|>; the engine must stop on the token id instead
        marker = encode(tokenizer, IM_END) if family.name == "chat" else []
        self.stop_token_ids: tuple[int, ...] = tuple(marker) if len(marker) == 1 else ()

    def document(self, text: str) -> list[int]:
        """A whole document's ids (cached: every task of the document asks for the same text)."""
        return list(_DOCUMENT_IDS.get(self.tokenizer, text)) if text else []

    def context(self, text: str) -> list[int]:
        """Any other context (a window, packed passages, partial summaries): not cached."""
        return self.tokenizer.encode(text) if text else []

    def prefix(self, context_ids: list[int]) -> list[int]:
        return [*self.head_ids, *context_ids]

    def suffix(self, task: TaskText) -> list[int]:
        return encode(self.tokenizer, self.family.task_text(task))

    def prompt(self, context_ids: list[int], task: TaskText) -> Prompt:
        prefix = self.prefix(context_ids)
        return Prompt([*prefix, *self.suffix(task)], len(prefix))

    def overhead(self, task: TaskText) -> int:
        """Tokens a prompt needs besides its context."""
        return len(self.head_ids) + len(self.suffix(task))

    def stop(self, *extra: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*extra, *self.family.stop)))

    def clean(self, text: str) -> str:
        """Generated text without any format marker the stop strings did not catch."""
        for marker in (*self.family.stop, IM_END, IM_START):
            cut = text.find(marker)
            if cut >= 0:
                text = text[:cut]
        return text.strip()

    def label_ids(self, task: TaskText, label: str) -> list[int]:
        """A label as the continuation of `task`'s prompt, ended as this family ends an answer (so
        "report" is not scored as the start of "reporting")."""
        ids = encode(self.tokenizer, self.family.answer_lead(task) + label)
        end = self.family.end_of_answer
        if end is not None:
            return ids + encode(self.tokenizer, end)
        return ids + ([self.eos_id] if self.eos_id is not None else [])
