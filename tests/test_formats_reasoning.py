"""Reasoning models (bot/formats/reasoning.py): private thoughts split from the answer, piece
by piece, then on a real model's output through the engine, the store and the terminal.

The bundled model does not reason, so a llama.cpp grammar makes it: its replies are
forced into `<think>…</think> answer` (or gpt-oss's harmony channels). Everything else
is real: the engine, ReplyText, the store, the prompts. (How Discord shows reasoning:
tests/test_discord_reasoning.py.)
"""

from __future__ import annotations

import io
import re
import sqlite3
from dataclasses import replace

import pytest

from bot.conversations.service import ChatService, UserMessage
from bot.config import Sampling
from bot.engine.local import Engine
from bot.formats.reasoning import ReplyFormat, ReplyText
from bot.formats.templates import Message, get_template
from bot.terminal import TerminalChat

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.1)
THINK = r'''root ::= "<think>" thought "</think>" " " answer
thought ::= "zq" [a-z ]{30,60}
answer ::= [A-Z] [a-z ,]{8,40} "."
'''
OPENED = r'''root ::= thought "</think>" " " answer
thought ::= "zq" [a-z ]{20,40}
answer ::= [A-Z] [a-z ,]{8,40} "."
'''
HARMONY = r'''root ::= "<|channel|>analysis<|message|>" thought "<|end|><|start|>assistant<|channel|>final<|message|>" answer
thought ::= "zq" [a-z ]{20,40}
answer ::= [A-Z] [a-z ,]{8,40} "."
'''
MARK = "zq"  # every thought the grammars allow starts with it, and no answer can contain it


def prompt(engine: Engine, text: str) -> tuple[list[int], tuple[str, ...]]:
    info = engine.info
    template = get_template("auto", gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
    return engine.vocab.encode(template.render([Message("system", "You are a helpful assistant."), Message("user", text)])), template.stop


# --- the splitter, piece by piece (pure) -----------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_reply_text_splits_think_blocks_whatever_the_piece_size(size: int) -> None:
    raw = "  <think>\nweigh the options</think>\n\nThe answer is 4.<|im_end|>ignored"
    out = ReplyText(ReplyFormat(stop=("<|im_end|>",)))
    reasoning = answer = ""
    thinking_seen = False
    for i in range(0, len(raw), size):
        r, a = out.add(raw[i : i + size])
        reasoning, answer = reasoning + r, answer + a
        thinking_seen |= out.thinking
        assert "<" not in a and "think" not in a  # never a marker, or half of one
    r, a = out.finish()
    assert (reasoning + r).strip() == "weigh the options"
    assert answer + a == "The answer is 4."
    assert out.stopped and not out.thinking
    assert thinking_seen or size >= len(raw)  # seen while the thought was being written


def test_reply_text_without_reasoning_is_all_answer() -> None:
    out = ReplyText(ReplyFormat())
    assert out.add("<thin") == ("", "")  # could still become <think>
    assert out.add("g> is a tag") == ("", "<thing> is a tag")
    assert out.finish() == ("", "")
    assert not out.thinking and out.reasoning == ""


def test_reply_text_when_the_prompt_opened_think() -> None:
    out = ReplyText(ReplyFormat(thinking=True))
    assert out.thinking
    r1, a1 = out.add("first I add</th")
    r2, a2 = out.add("ink>\n42")
    assert (r1 + r2, a1 + a2) == ("first I add", "42")
    assert not out.thinking


def test_reply_text_harmony_channels() -> None:
    raw = "<|channel|>analysis<|message|>User wants x.<|end|><|start|>assistant<|channel|>final<|message|>Here is x.<|return|>"
    out = ReplyText(ReplyFormat(harmony=True))
    pieces = [out.add(raw[i : i + 5]) for i in range(0, len(raw), 5)]
    rest = out.finish()
    assert "".join(p[0] for p in pieces) + rest[0] == "User wants x."
    assert "".join(p[1] for p in pieces) + rest[1] == "Here is x."
    assert out.stopped


def test_reply_text_unfinished_thought_has_no_answer() -> None:
    out = ReplyText(ReplyFormat())
    r1, a1 = out.add("<think>still going</thi")  # the end of a marker, maybe: held back
    r2, a2 = out.finish()
    assert (r1 + r2, a1 + a2) == ("still going</thi", "")


# --- the real engine --------------------------------------------------------------------------


async def test_engine_keeps_reasoning_out_of_the_answer(engine: Engine) -> None:
    tokens, stop = prompt(engine, "What is the capital of France?")
    gen = engine.generate("reason-think", tokens, max_tokens=120, sampling=GREEDY, fmt=ReplyFormat(stop=stop), grammar=THINK)
    streamed = [chunk async for chunk in gen.stream()]
    assert gen.finish_reason == "stop"
    assert gen.reasoning.strip().startswith(MARK) and MARK not in gen.text and "think>" not in gen.text
    assert re.fullmatch(r"[A-Z][a-z ,]{8,40}\.", gen.text.strip())
    assert "".join(streamed) == gen.text  # the answer stream never carried a thought
    assert gen.thought_s is not None


async def test_engine_reply_that_starts_inside_reasoning(engine: Engine) -> None:
    """DeepSeek-R1's prompt opens <think> itself: only </think> arrives."""
    tokens, stop = prompt(engine, "Name a colour.")
    gen = await engine.generate("reason-open", tokens, max_tokens=120, sampling=GREEDY, fmt=ReplyFormat(stop=stop, thinking=True), grammar=OPENED).wait()
    assert gen.reasoning.strip().startswith(MARK) and MARK not in gen.text and "</think>" not in gen.text
    assert gen.text.strip()


async def test_engine_harmony_answer_is_the_final_channel(engine: Engine) -> None:
    """gpt-oss: the end of the analysis message does not end the reply; the answer is `final`."""
    tokens, stop = prompt(engine, "Say something.")
    gen = await engine.generate("reason-harmony", tokens, max_tokens=160, sampling=GREEDY, fmt=ReplyFormat(stop=stop, harmony=True), grammar=HARMONY).wait()
    assert gen.reasoning.strip().startswith(MARK)
    assert re.fullmatch(r"[A-Z][a-z ,]{8,40}\.", gen.text.strip()), gen.text
    assert "<|" not in gen.text


# --- through the chat layer and the store -----------------------------------------------------


async def test_stored_apart_and_never_in_the_next_prompt(chat: ChatService, settings) -> None:
    chat.settings = replace(chat.settings, n_predict=120)
    chat.backend.grammar = THINK
    try:
        first = await chat.respond(UserMessage("dm:77", "Is the sea salty?", author_name="Ann"))
        await first.save()
    finally:
        chat.backend.grammar = None
    with sqlite3.connect(settings.database_path) as db:
        content, reasoning = db.execute("SELECT content, reasoning FROM messages WHERE role = 'assistant'").fetchone()
    assert reasoning.startswith(MARK) and MARK not in content and "<think>" not in content
    second = await chat.respond(UserMessage("dm:77", "Why?", author_name="Ann"))
    assert second.prompt.messages[-2] == Message("assistant", content)  # the answer only
    assert not any(MARK in m.content for m in second.prompt.messages)
    assert MARK not in chat.backend.engine.vocab.text_of(second.prompt.prepared.tokens)
    await second.save()


@pytest.mark.parametrize("mode", ["hide", "show"])
async def test_terminal_follows_thinking(chat: ChatService, mode: str) -> None:
    chat.settings = replace(chat.settings, thinking=mode, n_predict=120)
    chat.backend.grammar = THINK
    out = io.StringIO()
    try:
        await TerminalChat(chat, scope=f"terminal:{mode}", out=out)._reply("Is the sky blue?")
    finally:
        chat.backend.grammar = None
    text = out.getvalue()
    answer = text.split("\n")[-2]
    assert re.fullmatch(r"[A-Z][a-z ,]{8,40}\.", answer.strip()), text
    if mode == "hide":
        assert MARK not in text and "(thinking…)" in text and re.search(r"\(thought for \d+ s\)", text)
    else:
        assert "(thinking) " + MARK in text
