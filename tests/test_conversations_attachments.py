"""Attached files, the pure part (bot/conversations/attachments.py): what is text, how it is
decoded, and how it is put into a turn. (Through Discord: tests/test_discord_files.py.)"""

from __future__ import annotations

from bot.conversations.attachments import TextFile, decode_text, kind_of, render_files


def test_text_detection_and_decoding() -> None:
    assert kind_of("main.rs", None) == "text" and kind_of("data", "application/json; charset=utf-8") == "text"
    assert kind_of("photo.JPG", None) == "image" and kind_of("clip", "video/mp4") == "media"
    assert kind_of("paper.pdf", "application/pdf") == "binary" and kind_of("README", None) == "unknown"
    assert decode_text("h\u00e9llo\r\nw\u00f6rld".encode(), cut=False) == "h\u00e9llo\nw\u00f6rld"
    assert decode_text(b"\xef\xbb\xbfwith a BOM", cut=False) == "with a BOM"
    assert decode_text(b"\x00\x01\x02binary", cut=False) is None
    assert decode_text(b"\xff\xfe latin-1 \xe9", cut=False) is None
    split = "caf\u00e9".encode()[:-1]  # cut in the middle of the last character
    assert decode_text(split, cut=True) == "caf" and decode_text(split, cut=False) is None


def test_a_file_cannot_close_its_fence_early() -> None:
    inner = "Some notes\n````\nnot the end\n````\n"
    block = render_files([TextFile("notes.md", inner, size=len(inner), read_bytes=len(inner))])
    assert block == "Attached file notes.md:\n`````md\n" + inner + "`````"
    weird = render_files([TextFile("a`b\nc.txt", "x", size=1, read_bytes=1)])
    assert weird is not None and weird.startswith("Attached file a_b_c.txt:\n```txt\nx\n```")
