"""Every template against a reference nobody here wrote, computed at test time.

- Named templates: llama.cpp's own chat formatter (`llama_chat_apply_template` with its
  built-in template of the family), with the exact differences docs/models.md's template table
  states; for SentencePiece families also the token ids that the model authors' own code
  builds (Meta's llama `chat_completion`, mistral-common's v1 instruct tokenizer, FastChat),
  and BELLE's documented prompt.
- `auto`: each real chat template in ../shared/reference/templates (or the same files from the llama-cpp-python sdist), built into a GGUF of
  its family's vocabulary, rendered by the bot exactly as Hugging Face's `apply_chat_template`
  renders it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.engine.backend import ModelInfo
from bot.formats.templates import AUTO, TEMPLATES, JinjaTemplate, Message, get_template, prompt_text, reply_format
from bot.engine.vocab import Vocab, load_vocab
from tests.conftest import run_cli
from tests.references import HF_FAMILIES, HF_TEMPLATES, hf_render, llama_cpp_chat, vocab_path  # the fixtures over these files are in conftest.py

Pairs = list[tuple[str, str]]

CONVERSATIONS: dict[str, Pairs] = {
    "one turn": [("user", "Hello there")],
    "system, one turn": [("system", "You are terse."), ("user", "Hello there")],
    "system, two turns": [("system", "You are terse."), ("user", "What's the capital of France?"), ("assistant", "Paris."), ("user", "And of Norway?")],
    "no system, three turns": [("user", "Hi!"), ("assistant", "Hello."), ("user", "Name a colour."), ("assistant", "Teal."), ("user", "Another?")],
}


def render(name: str, pairs: Pairs) -> str:
    return prompt_text(TEMPLATES[name].render([Message(r, c) for r, c in pairs]))


def answers(pairs: Pairs) -> list[str]:
    return [c for r, c in pairs if r == "assistant"]


# --- named templates against llama.cpp ------------------------------------------------------

# Our template -> (llama.cpp's built-in template, how our text differs from llama.cpp's, exactly).
# docs/models.md's template table says the same, and why.


def _llama2(ref: str, pairs: Pairs) -> str:
    # Meta's chat_completion writes `[/INST] {answer} </s>` (spaces around the answer) and a BOS
    # before every [INST]; llama.cpp writes `[/INST]{answer}</s>` and leaves the first BOS to the tokenizer.
    for a in answers(pairs):
        ref = ref.replace(f"[/INST]{a}</s>", f"[/INST] {a} </s>")
    return "<s>" + ref


def _mistral(ref: str, pairs: Pairs) -> str:
    # llama.cpp's mistral-v1 writes ` [INST]`: the SentencePiece space of mistral-common's
    # tokens, spelled out. Tokenized again that space is an extra token; ours gives
    # mistral-common's exact tokens (see test_sentencepiece_families_match_their_authors_tokens).
    assert ref.startswith(" [INST] ")
    return "<s>" + ref[1:].replace("</s> [INST] ", "</s>[INST] ")


def _vicuna(ref: str, pairs: Pairs) -> str:
    # FastChat's vicuna_v1.1 (what Vicuna was trained on) separates turns with " " and
    # nothing after "</s>"; llama.cpp's vicuna uses newlines.
    return ref.replace("\n\nUSER: ", " USER: ").replace("</s>\nUSER: ", "</s>USER: ").replace("\nUSER: ", " USER: ").replace("\nASSISTANT:", " ASSISTANT:")


LLAMA_CPP: dict[str, tuple[str, Callable[[str, Pairs], str]]] = {
    "chatml": ("chatml", lambda ref, pairs: ref),
    "phi-3-chat": ("phi3", lambda ref, pairs: ref),
    # llama.cpp leaves BOS to the tokenizer; we write it (Vocab.encode adds no second one).
    "llama-3-chat": ("llama3", lambda ref, pairs: "<|begin_of_text|>" + ref),
    "gemma-instruct": ("gemma", lambda ref, pairs: "<bos>" + ref),
    # llama.cpp's zephyr is StableLM Zephyr's (`<|endoftext|>`); Zephyr 7B ends turns with its EOS `</s>`.
    "zephyr": ("zephyr", lambda ref, pairs: ref.replace("<|endoftext|>", "</s>")),
    "llama-2-chat": ("llama2-sys-bos", _llama2),
    "codellama-instruct": ("llama2-sys-bos", _llama2),
    "mistral-instruct": ("mistral-v1", _mistral),
    "vicuna-chat": ("vicuna", _vicuna),
}


def test_every_named_template_has_a_reference() -> None:
    assert set(LLAMA_CPP) | {"belle-llama-2-chat"} == set(TEMPLATES)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", LLAMA_CPP)
def test_named_template_matches_llama_cpp(name: str, conversation: str) -> None:
    builtin, differences = LLAMA_CPP[name]
    pairs = CONVERSATIONS[conversation]
    reference = llama_cpp_chat(builtin, pairs)
    assert render(name, pairs) == differences(reference, pairs)


def test_the_stated_differences_are_real() -> None:
    """Where the table says a template differs from llama.cpp's, it does (no stale notes)."""
    pairs = CONVERSATIONS["system, two turns"]
    for name, (builtin, _) in LLAMA_CPP.items():
        reference = llama_cpp_chat(builtin, pairs)
        same = name in ("chatml", "phi-3-chat")
        assert (render(name, pairs) == reference) == same, name


def test_belle_matches_its_documented_prompt() -> None:
    """BELLE (LianjiaTech/BELLE, train/src/sample_generator.py): each human turn is
    "Human: \\n{text}\\n\\nAssistant: \\n", each answer is followed by EOS; no system role."""
    pairs = CONVERSATIONS["no system, three turns"]
    expected = ""
    for role, content in pairs:
        expected += f"Human: \n{content}\n\nAssistant: \n" if role == "user" else content + "</s>"
    assert render("belle-llama-2-chat", pairs) == expected


# --- token ids, as the model authors' own code builds them ---------------------------------


@pytest.fixture(scope="module")
def spm() -> Vocab:
    vocab = load_vocab(vocab_path("llama-spm"))
    yield vocab
    vocab.close()


def meta_llama2(vocab: Vocab, pairs: Pairs) -> list[int]:
    """Meta's llama/generation.py `chat_completion` (Code Llama's is the same): the system
    prompt is folded into the first user turn between <<SYS>> markers; each exchange is
    `encode(f"[INST] {user} [/INST] {answer} ", bos=True, eos=True)`, the last question
    `encode(f"[INST] {user} [/INST]", bos=True)`."""
    sp = lambda text: vocab.tokenize(text, special=False)  # noqa: E731  (SentencePiece encode, dummy prefix included)
    eos = vocab.tokenize("</s>", special=True)[-1]
    if pairs[0][0] == "system":
        pairs = [("user", f"<<SYS>>\n{pairs[0][1]}\n<</SYS>>\n\n{pairs[1][1]}")] + pairs[2:]
    tokens: list[int] = []
    for (_, user), (_, answer) in zip(pairs[0::2], pairs[1::2]):
        tokens += [vocab.bos] + sp(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [eos]
    return tokens + [vocab.bos] + sp(f"[INST] {pairs[-1][1].strip()} [/INST]")


def mistral_common_v1(vocab: Vocab, pairs: Pairs) -> list[int]:
    """mistral-common's InstructTokenizerV1 (Mistral 7B Instruct v0.1): BOS, then each user
    message `encode(f"[INST] {content} [/INST]")` with the system prompt before the first one
    ("{system}\\n\\n{content}"), each answer `encode(content)` + EOS."""
    sp = lambda text: vocab.tokenize(text, special=False)  # noqa: E731
    eos = vocab.tokenize("</s>", special=True)[-1]
    system = pairs[0][1] if pairs[0][0] == "system" else None
    tokens = [vocab.bos]
    for i, (role, content) in enumerate(p for p in pairs if p[0] != "system"):
        if role == "user":
            if i == 0 and system:
                content = f"{system}\n\n{content}"
            tokens += sp(f"[INST] {content} [/INST]")
        else:
            tokens += sp(content) + [eos]
    return tokens


def fastchat_vicuna(vocab: Vocab, pairs: Pairs) -> list[int]:
    """FastChat's vicuna_v1.1 conversation (sep " ", sep2 "</s>"), tokenized whole with BOS
    as FastChat does: system + " " + "USER: {u} ASSISTANT: {a}</s>USER: {u} ASSISTANT:"."""
    system = pairs[0][1] if pairs[0][0] == "system" else ""
    prompt = system + " " if system else ""
    for role, content in (p for p in pairs if p[0] != "system"):
        prompt += f"USER: {content} " if role == "user" else f"ASSISTANT: {content}</s>"
    prompt += "ASSISTANT:"
    return [vocab.bos] + vocab.tokenize(prompt, special=True)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize(
    "name, authors",
    [("llama-2-chat", meta_llama2), ("codellama-instruct", meta_llama2), ("mistral-instruct", mistral_common_v1), ("vicuna-chat", fastchat_vicuna)],
)
def test_sentencepiece_families_match_their_authors_tokens(spm: Vocab, name: str, authors: Callable[[Vocab, Pairs], list[int]], conversation: str) -> None:
    pairs = CONVERSATIONS[conversation]
    ours = spm.encode(TEMPLATES[name].render([Message(r, c) for r, c in pairs]))
    assert ours == authors(spm, pairs)


def test_llama_cpp_mistral_v1_text_would_tokenize_differently(spm: Vocab) -> None:
    """Why mistral-instruct does not copy llama.cpp's spacing: tokenized, ` [INST]` after a
    special token gains an extra space token that mistral-common never produces."""
    pairs = CONVERSATIONS["system, two turns"]
    theirs = [spm.bos] + spm.tokenize(llama_cpp_chat("mistral-v1", pairs), special=True)
    assert theirs != mistral_common_v1(spm, pairs)
    assert len(theirs) > len(mistral_common_v1(spm, pairs))


# --- the command line prints the same ------------------------------------------------------


def messages_file(tmp_path: Path, pairs: Pairs) -> Path:
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps([{"role": r, "content": c} for r, c in pairs]), encoding="utf-8")
    return path


def test_render_prompt_prints_llama_cpp_reference(tmp_path: Path) -> None:
    """`python -m bot render-prompt` prints exactly the family's reference, for each named template."""
    pairs = CONVERSATIONS["system, two turns"]
    for name, (builtin, differences) in LLAMA_CPP.items():
        result = run_cli("render-prompt", "--template", name, "--messages", str(messages_file(tmp_path, pairs)), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout == differences(llama_cpp_chat(builtin, pairs), pairs), name


def test_render_prompt_auto_prints_hugging_face_rendering(tmp_path: Path, hf_ggufs: dict[str, Path], hf_infos: dict[str, ModelInfo]) -> None:
    model, info = hf_ggufs["Qwen-Qwen3-0.6B"], hf_infos["Qwen-Qwen3-0.6B"]
    pairs = [("system", "Be brief."), ("user", "2+2?"), ("assistant", "<think>\nadd\n</think>\n\n4"), ("user", "3+3?")]
    result = run_cli("render-prompt", "--template", "auto", "--model", str(model), "--messages", str(messages_file(tmp_path, pairs)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "<think>" not in result.stdout  # Qwen3 drops earlier reasoning itself
    assert result.stdout == hf_render(info.chat_template, hf_messages(pairs), bos_token=info.bos_token, eos_token=info.eos_token)


# --- auto: each real template in its GGUF equals Hugging Face's rendering -----------------

THINKING = "<think>\nThe user greets me. I should greet back.\n</think>\n\nHello! How can I help?"
AUTO_CONVERSATIONS: dict[str, Pairs] = {
    "no system": [("user", "Hello there"), ("assistant", "Hi! What can I do for you?"), ("user", "Tell me a joke.")],
    "system": [("system", "You are a pirate."), ("user", "Hello there"), ("assistant", "Arr, hello."), ("user", "Where is the treasure?")],
    "earlier reasoning": [("system", "Think first."), ("user", "Hi"), ("assistant", THINKING), ("user", "What is 2+2?")],
    "spaces and newlines": [("user", "  padded question  \n"), ("assistant", "\n answer with spaces \n"), ("user", "\tlast\t")],
}


def hf_messages(pairs: Pairs) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def folded(pairs: Pairs) -> Pairs:
    """The bot's fold for templates without a system role: the system text, a blank line,
    then the first turn."""
    if pairs[0][0] != "system":
        return pairs
    (_, system), (role, first), *rest = pairs
    return [(role, f"{system.strip()}\n\n{first.strip()}"), *rest]


def bot_auto(info: ModelInfo, **kwargs: object):
    """`auto` built from a model's info the way the bot builds it (ChatService.template)."""
    return get_template(AUTO, gguf_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token, **kwargs), info


def hf_reference(info, pairs: Pairs, **kwargs: object) -> set[str]:
    """Hugging Face's rendering; two if the day turned while rendering (gpt-oss writes the date)."""
    messages = hf_messages(pairs)
    try:
        return {hf_render(info.chat_template, messages, bos_token=info.bos_token, eos_token=info.eos_token, **kwargs)}
    except Exception as exc:  # Gemma rejects a system role: Hugging Face's rendering of the folded messages
        assert "System role not supported" in str(exc)
        return {hf_render(info.chat_template, hf_messages(folded(pairs)), bos_token=info.bos_token, eos_token=info.eos_token, **kwargs)}


@pytest.mark.parametrize("conversation", AUTO_CONVERSATIONS)
@pytest.mark.parametrize("name", list(HF_FAMILIES))
def test_auto_equals_hugging_face(hf_infos: dict[str, ModelInfo], name: str, conversation: str) -> None:
    template, info = bot_auto(hf_infos[name])
    assert isinstance(template, JinjaTemplate) and template.source == (HF_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    pairs = AUTO_CONVERSATIONS[conversation]
    before = hf_reference(info, pairs)
    ours = prompt_text(template.render([Message(r, c) for r, c in pairs]))
    assert ours in before | hf_reference(info, pairs)


@pytest.mark.parametrize("name", ["Qwen-Qwen3-0.6B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"])
def test_earlier_reasoning_is_dropped_by_the_template_itself(hf_infos: dict[str, ModelInfo], name: str) -> None:
    template, _ = bot_auto(hf_infos[name])
    segments = template.render([Message(r, c) for r, c in AUTO_CONVERSATIONS["earlier reasoning"]])
    assert "I should greet back" not in prompt_text(segments)
    assert any(not s.special and s.text.strip() == "Hello! How can I help?" for s in segments)


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("name", ["Qwen-Qwen3-0.6B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"])
def test_enable_thinking_reaches_the_template(hf_infos: dict[str, ModelInfo], name: str, enable_thinking: bool | None) -> None:
    template, info = bot_auto(hf_infos[name], enable_thinking=enable_thinking)
    pairs = AUTO_CONVERSATIONS["system"]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    assert prompt_text(template.render([Message(r, c) for r, c in pairs])) in hf_reference(info, pairs, **kwargs)


def test_qwen3_thinking_off(hf_infos: dict[str, ModelInfo]) -> None:
    """ENABLE_THINKING=false: Qwen3's generation prompt closes an empty think block, and the
    reply is read as a plain answer."""
    template, _ = bot_auto(hf_infos["Qwen-Qwen3-0.6B"], enable_thinking=False)
    segments = template.render([Message("user", "Hi")])
    assert prompt_text(segments).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert reply_format(template, segments).thinking is False
    default, _ = bot_auto(hf_infos["Qwen-Qwen3-0.6B"])
    plain = default.render([Message("user", "Hi")])
    assert prompt_text(plain).endswith("<|im_start|>assistant\n")  # the model decides whether to think
    assert reply_format(default, plain).thinking is False  # ReplyText still sees a <think> it opens


def test_deepseek_generation_prompt_opens_reasoning(hf_infos: dict[str, ModelInfo]) -> None:
    template, _ = bot_auto(hf_infos["deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"], enable_thinking=True)
    segments = template.render([Message("user", "Hi")])
    assert prompt_text(segments).endswith("<｜Assistant｜><think>\n")
    assert reply_format(template, segments).thinking is True


def test_gpt_oss_is_harmony_and_dated_today(hf_infos: dict[str, ModelInfo]) -> None:
    from datetime import date

    template, _ = bot_auto(hf_infos["openai-gpt-oss-120b"])
    before = date.today()
    segments = template.render([Message("user", "Hi")])
    days = {f"Current date: {d:%Y-%m-%d}" for d in (before, date.today())}
    assert any(day in prompt_text(segments) for day in days)  # strftime_now reaches the template's macros
    assert template.harmony and reply_format(template, segments).harmony
    assert prompt_text(segments).endswith("<|start|>assistant")


def test_gemma2_refuses_a_system_role_so_it_is_folded(hf_infos: dict[str, ModelInfo]) -> None:
    template, info = bot_auto(hf_infos["google-gemma-2-2b-it"])
    assert isinstance(template, JinjaTemplate) and not template.supports_system
    with pytest.raises(Exception, match="System role not supported"):
        hf_render(info.chat_template, hf_messages(AUTO_CONVERSATIONS["system"]), bos_token=info.bos_token, eos_token=info.eos_token)


def test_render_prompt_explains_messages_a_template_refuses(tmp_path: Path, hf_ggufs: dict[str, Path]) -> None:
    """Gemma insists on alternating roles; two user turns in a row are one readable error line."""
    pairs = [("user", "Hi"), ("user", "Hello?")]
    result = run_cli("render-prompt", "--template", "auto", "--model", str(hf_ggufs["google-gemma-2-2b-it"]), "--messages", str(messages_file(tmp_path, pairs)), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "roles must alternate" in result.stderr


def test_system_prompt_alone_renders_for_every_real_template(hf_infos: dict[str, ModelInfo]) -> None:
    """The chat layer measures the system prompt on its own; Mistral's templates write it only
    inside the last user turn, so alone it is simply absent (as for Hugging Face), not an error."""
    for name, info in hf_infos.items():
        template, _ = bot_auto(info)
        assert isinstance(template, JinjaTemplate), name
        ours = prompt_text(template.render([Message("system", "Be brief.")]))
        if template.supports_system:
            assert ours in hf_reference(info, [("system", "Be brief.")]), name
        else:  # Gemma: it will lead the first user turn, so it is measured as one
            assert ours in hf_reference(info, [("user", "Be brief.")]), name
