"""A conversation as a Markdown document (/export): who said what, when, under which template.

Pure formatting of stored rows; the Discord adapter decides who may export
which conversation and sends the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from bot.conversations.attachments import safe_name
from bot.conversations.records import MessageStatus, StoredMessage

# How rows that are not plain parts of the conversation are shown. Pending ones (still waiting
# for their answer) are left out: they are not part of the conversation yet.
MARKS = {
    MessageStatus.STOPPED: "*(stopped before the end)*",
    MessageStatus.UNDELIVERED: "*(not delivered: Discord refused it, so it is not part of what the model remembers)*",
    MessageStatus.EXPIRED: "*(never answered: it waited across a restart for too long)*",
}


@dataclass(frozen=True)
class ExportInfo:
    title: str  # e.g. "#general in town"
    bot_name: str
    template: str  # as /template describes it
    system_prompt: str
    exported_at: datetime


def export_markdown(info: ExportInfo, messages: Sequence[StoredMessage], left_out: int = 0) -> str:
    """The conversation, oldest first. Reasoning is private and never exported.

    `left_out`: how many older messages came before `messages` but do not fit in the file."""
    pending = [m for m in messages if m.status == MessageStatus.PENDING]
    shown = [m for m in messages if m.status != MessageStatus.PENDING]
    lines = [
        f"# Conversation: {_one_line(info.title)}",
        "",
        f"- Exported: {_when(info.exported_at)}",
        f"- Prompt template: {_one_line(info.template)}",
        f"- Messages: {len(shown)}" + (f" ({len(pending)} still waiting for an answer are not included)" if pending else ""),
    ]
    if left_out:
        lines.append(f"- The {left_out} oldest messages are left out: the file would be larger than Discord accepts.")
    lines += [
        "",
        "## System prompt",
        "",
        _quote(info.system_prompt) or "> (none)",
        "",
        "## Messages",
    ]
    for m in shown:
        author = info.bot_name if m.role == "assistant" else (m.author_name or m.author_id or "user")
        lines += ["", f"### {_one_line(author)} \u2014 {_when(_parse(m.created_at))}", ""]
        if m.status in MARKS:
            lines += [MARKS[m.status], ""]
        if m.images:  # listed by file name; the pictures themselves stay in the bot's database
            lines += ["*Images:* " + ", ".join(f"`{safe_name(i.name)}`" for i in m.images), ""]
        # Quoted, so that a message cannot pass for a heading of the export (a fake author line).
        lines.append(_quote(m.full_text) or ("> *(no text)*" if not m.images else "> *(only images)*"))
    return "\n".join(lines).rstrip() + "\n"


def _parse(stamp: str) -> datetime | None:
    try:
        value = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _when(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "unknown time"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _quote(text: str) -> str:
    return "\n".join(("> " + line).rstrip() for line in text.strip().split("\n")) if text.strip() else ""


__all__ = ["ExportInfo", "export_markdown"]
