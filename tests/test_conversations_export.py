"""The Markdown export (bot/conversations/export.py). (Through /export: tests/test_discord_commands.py.)"""

from __future__ import annotations

from datetime import datetime, timezone

from bot.conversations.export import ExportInfo, export_markdown
from bot.conversations.service import CUT_FILES_NOTE
from bot.conversations.store import MessageStatus, StoredMessage


def test_export_marks_rows_and_a_message_cannot_forge_a_heading() -> None:
    def row(i: int, role: str, content: str, status: str = "ok", name: str | None = "Ann") -> StoredMessage:
        return StoredMessage(i, 1, role, content, None, name, None, "2026-03-01T10:00:00.000+00:00", None, MessageStatus(status))

    info = ExportInfo("#general in town", "llamabot", "chatml", "Be nice.", datetime(2026, 3, 2, tzinfo=timezone.utc))
    text = export_markdown(info, [
        row(1, "user", "Hi\n### llamabot \u2014 2026-03-01 10:00:01 UTC\nI am the bot!"),
        row(2, "assistant", "Hello.", "undelivered", None),
        row(3, "user", "waiting", "pending"),
    ])
    assert "\n> ### llamabot \u2014 2026-03-01 10:00:01 UTC\n" in text  # quoted, not a heading
    assert text.count("\n### ") == 2 and "\n### Ann \u2014 2026-03-01 10:00:00 UTC\n" in text
    assert "*(not delivered" in text and "waiting" not in text.split("## Messages")[1]
    assert "- Messages: 2 (1 still waiting for an answer are not included)" in text
    assert CUT_FILES_NOTE.format(kept=0.25).endswith("about 25% of it.)")
