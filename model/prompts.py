"""Prompt styles: how a model expects a conversation to be written out as text.

A prompt is either a plain string (one user turn) or an OpenAI-style conversation, a list of
`{"role": "system" | "user" | "assistant", "content": str}` messages. `PromptStyle.apply` returns the text to
tokenize. For the chat models it is exactly what the model's official `chat_template` renders through
`tokenizer.apply_chat_template(..., tokenize=False)`, minus the BOS token at the very start: the tokenizer
adds BOS itself (`Tokenizer.encode(text)`), so leaving it in the text would double it. Special tokens that
appear later in the text ("</s><s>[INST]" between Llama 2 turns, "<|eot_id|>", ...) stay in the text, and the
tokenizer turns each into its single id. tests/test_prompts.py renders the official templates and compares.

`apply_turns` gives the same text cut into segments, each flagged with whether it is assistant output that
training puts the loss on: the assistant's words plus the end-of-turn marker the model must learn to emit
("<|im_end|>", "<|eot_id|>", "</s>", ...). Plain-text formats (default, alpaca, phi2, falcon) have no such
marker; their turns end with the tokenizer's EOS token, which the data code appends.

A checkpoint directory says which style it wants in `prompt_style.yaml` (written by the converter with
`save_prompt_style`); `load_prompt_style` falls back to recognising the family from the chat template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import EllipsisType
from typing import Any

import yaml

from model.files import atomic_write_text

PROMPT_STYLE_FILE = "prompt_style.yaml"
ROLES = ("system", "user", "assistant")

Message = dict[str, str]
Turn = tuple[str, str]  # (role, content)
Segments = list[tuple[str, bool]]  # (text, is_assistant_output)


class PromptStyle:
    """The raw prompt, no template: for base models. A conversation is its contents concatenated as they are."""

    name = "default"
    default_system: str | None = None
    # The official template raises unless the turns go user, assistant, user, ...
    alternating = False

    def __init__(self, default_system: str | None | EllipsisType = ...) -> None:
        # `...` keeps the class default; None or a string overrides it for this instance.
        if default_system is not ...:
            self.default_system = default_system

    def apply(
        self, prompt: str | list[Message], system: str | None = None, add_generation_prompt: bool = True
    ) -> str:
        """The text to tokenize (without the leading BOS token). `system` is used when the conversation has no
        system message of its own; without either, the style's `default_system` is used (if it has one)."""
        return "".join(text for text, _ in self._segments(prompt, system, add_generation_prompt))

    def apply_turns(self, messages: str | list[Message], system: str | None = None) -> Segments:
        """`apply(messages, system, add_generation_prompt=False)` cut into `(text, is_assistant_output)` segments."""
        merged: Segments = []
        for text, trained in self._segments(messages, system, add_generation_prompt=False):
            if not text:
                continue
            if merged and merged[-1][1] == trained:
                merged[-1] = (merged[-1][0] + text, trained)
            else:
                merged.append((text, trained))
        return merged

    def stop_tokens(self) -> tuple[str, ...]:
        """Strings that end generation, in addition to the tokenizer's EOS token."""
        return ()

    def render(self, system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
        segments = [] if system is None else [(system, False)]
        segments += [(content, role == "assistant") for role, content in turns]
        return segments

    def _segments(self, prompt: Any, system: str | None, add_generation_prompt: bool) -> Segments:
        system, turns = self._conversation(prompt, system)
        return self.render(system, turns, add_generation_prompt)

    def _conversation(self, prompt: str | list[Message], system: str | None) -> tuple[str | None, list[Turn]]:
        if not isinstance(prompt, (str, list, tuple)):
            raise ValueError(f"The {self.name!r} prompt style takes a string or a list of messages, got {prompt!r}")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not messages:
            raise ValueError("The conversation is empty: give a prompt string or at least one message.")
        for i, message in enumerate(messages):
            if not (
                isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
            ):
                raise ValueError(
                    f"Message {i} must be a dict with 'role' one of {', '.join(ROLES)} and a string 'content',"
                    f" got {message!r}"
                )
            if message["role"] == "system" and i > 0:
                raise ValueError(f"Message {i} is a system message; a system message may only come first.")
        if messages[0]["role"] == "system":
            if system is not None:
                raise ValueError("The conversation has a system message and `system` was given too; give only one.")
            system, messages = messages[0]["content"], messages[1:]
        elif system is None:
            system = self.default_system
        turns = [(message["role"], message["content"]) for message in messages]
        if self.alternating:
            for i, (role, _) in enumerate(turns):
                expected = "user" if i % 2 == 0 else "assistant"
                if role != expected:
                    raise ValueError(
                        f"The {self.name!r} prompt style needs turns that alternate user/assistant/user/..."
                        f" (after an optional system message); turn {i} is {role!r}, expected {expected!r}."
                    )
        return system, turns

    @classmethod
    def from_name(cls, name: str) -> PromptStyle:
        if name not in prompt_styles:
            raise ValueError(f"Unknown prompt style {name!r}. Valid names: {', '.join(prompt_styles)}")
        return prompt_styles[name]()

    @classmethod
    def from_config(cls, config_name_or_repo: str) -> PromptStyle:
        """The style of a model, from its config name or HF repo id ("meta-llama/Llama-2-7b-chat-hf")."""
        model_name = config_name_or_repo.rstrip("/").split("/")[-1].lower()
        for pattern, style in _STYLE_BY_MODEL_NAME:
            if re.search(pattern, model_name):
                return cls.from_name(style)
        return cls.from_name("default")


class Alpaca(PromptStyle):
    """The Stanford Alpaca template. `apply` also takes `{"instruction": ..., "input": ...}`; a system prompt,
    if given, replaces the "Below is an instruction..." preamble."""

    name = "alpaca"
    preamble = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    preamble_with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
    )

    def _segments(self, prompt: Any, system: str | None, add_generation_prompt: bool) -> Segments:
        input_text = ""
        if isinstance(prompt, dict):
            if not isinstance(prompt.get("instruction"), str) or not isinstance(prompt.get("input", ""), str):
                raise ValueError(
                    f"An alpaca prompt dict needs a string 'instruction' and optionally an 'input', got {prompt!r}"
                )
            input_text = prompt.get("input", "")
            prompt = prompt["instruction"]
        system, turns = self._conversation(prompt, system)
        if system is None:
            system = self.preamble_with_input if input_text else self.preamble
        segments = [(system, False)]
        for i, (role, content) in enumerate(turns):
            if role == "user":
                segments.append((f"\n\n### Instruction:\n{content}", False))
                if i == 0 and input_text:
                    segments.append((f"\n\n### Input:\n{input_text}", False))
            else:
                segments += [("\n\n### Response:\n", False), (content, True)]
        if add_generation_prompt:
            segments.append(("\n\n### Response:\n", False))
        return segments

    def stop_tokens(self) -> tuple[str, ...]:
        return ("\n### Instruction:",)


class ChatML(PromptStyle):
    """<|im_start|>role\\n...<|im_end|>. The default system prompt is SmolLM2-Instruct's, as its template adds it
    to every conversation that has none; other ChatML models take `ChatML(default_system=...)`."""

    name = "chatml"
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    def render(self, system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
        segments = [] if system is None else [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
        for role, content in turns:
            if role == "user":
                segments.append((f"<|im_start|>user\n{content}<|im_end|>\n", False))
            else:
                segments += [("<|im_start|>assistant\n", False), (f"{content}<|im_end|>", True), ("\n", False)]
        if add_generation_prompt:
            segments.append(("<|im_start|>assistant\n", False))
        return segments

    def stop_tokens(self) -> tuple[str, ...]:
        return ("<|im_end|>",)


class Llama2(PromptStyle):
    """Llama 2 chat: [INST] <<SYS>>...<</SYS>> ... [/INST]. The template has no generation prompt."""

    name = "llama2"
    alternating = True

    def render(self, system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
        segments = []
        for i, (role, content) in enumerate(turns):
            if role == "user":
                if i == 0 and system is not None:
                    content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
                # Every user turn starts with BOS in the text; only the very first is left to the tokenizer.
                bos = "<s>" if i > 0 else ""
                segments.append((f"{bos}[INST] {content.strip()} [/INST]", False))
            else:
                # The leading space stays with the answer: sentencepiece folds it into the first word's token.
                segments.append((f" {content.strip()} </s>", True))
        return segments

    def stop_tokens(self) -> tuple[str, ...]:
        return ("</s>",)


class Llama3(PromptStyle):
    """Llama 3 instruct: <|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>, contents stripped."""

    name = "llama3"

    @staticmethod
    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def system_block(self, system: str | None) -> str:
        return "" if system is None else f"{self.header('system')}{system.strip()}<|eot_id|>"

    def render(self, system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
        segments = [(self.system_block(system), False)]
        for role, content in turns:
            if role == "user":
                segments.append((f"{self.header('user')}{content.strip()}<|eot_id|>", False))
            else:
                segments += [(self.header("assistant"), False), (f"{content.strip()}<|eot_id|>", True)]
        if add_generation_prompt:
            segments.append((self.header("assistant"), False))
        return segments

    def stop_tokens(self) -> tuple[str, ...]:
        return ("<|eot_id|>",)


class Llama31(Llama3):
    """Llama 3.1 / 3.2 / 3.3 instruct: Llama 3 plus a system block that is always there and dates the model.

    Llama 3.1 and 3.3 templates write "Today Date: 26 Jul 2024" unless told otherwise; Llama 3.2's writes the
    day the prompt is rendered. We keep the fixed date so the same conversation always tokenizes the same.
    """

    name = "llama3.1"
    date_string = "26 Jul 2024"

    def system_block(self, system: str | None) -> str:
        system = (system or "").strip()
        knowledge = f"Cutting Knowledge Date: December 2023\nToday Date: {self.date_string}\n\n"
        return f"{self.header('system')}{knowledge}{system}<|eot_id|>"

    def stop_tokens(self) -> tuple[str, ...]:
        return ("<|eot_id|>", "<|eom_id|>")


class Mistral(PromptStyle):
    """Mistral-7B-Instruct v0.1 / v0.2 and Mixtral-8x7B-Instruct: " [INST] ... [/INST]", the system prompt
    prepended to the first user turn. The text starts with a space: the official rendering is "<s> [INST]"."""

    name = "mistral"
    alternating = True

    def render(self, system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
        segments = []
        for i, (role, content) in enumerate(turns):
            if role == "user":
                if i == 0 and system is not None:
                    content = f"{system}\n\n{content}"
                segments.append((f" [INST] {content} [/INST]", False))
            else:
                segments.append((f" {content}</s>", True))
        return segments

    def stop_tokens(self) -> tuple[str, ...]:
        return ("</s>",)


class MistralV03(PromptStyle):
    """Mistral-7B-Instruct v0.3 (the v3 tokenizer, where [INST] and [/INST] are control tokens).

    The official template puts the system prompt before the *last* user turn, so a conversation that ends
    with an assistant turn (training data) carries no system prompt at all; we render what it renders.
    """

    name = "mistral-v0.3"
    alternating = True

    def render(self, system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
        segments = []
        for i, (role, content) in enumerate(turns):
            if role == "user":
                if i == len(turns) - 1 and system is not None:
                    content = f"{system}\n\n{content}"
                segments.append((f"[INST] {content}[/INST]", False))
            else:
                segments.append((f" {content.strip()}</s>", True))
        return segments

    def stop_tokens(self) -> tuple[str, ...]:
        return ("</s>",)


class Phi3(PromptStyle):
    """Phi-3 instruct: <|user|>\\n...<|end|>\\n<|assistant|>\\n. Without a generation prompt the template ends
    the text with EOS (<|endoftext|>)."""

    name = "phi3"

    def render(self, system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
        segments = [] if system is None else [(f"<|system|>\n{system}<|end|>\n", False)]
        for role, content in turns:
            if role == "user":
                segments.append((f"<|user|>\n{content}<|end|>\n", False))
            else:
                segments += [("<|assistant|>\n", False), (f"{content}<|end|>", True), ("\n", False)]
        segments.append(("<|assistant|>\n" if add_generation_prompt else "<|endoftext|>", False))
        return segments

    def stop_tokens(self) -> tuple[str, ...]:
        return ("<|end|>",)


class Zephyr(PromptStyle):
    """Zephyr and TinyLlama-Chat: <|user|>\\n...</s>\\n<|assistant|>\\n."""

    name = "zephyr"

    def render(self, system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
        segments = [] if system is None else [(f"<|system|>\n{system}</s>\n", False)]
        for role, content in turns:
            if role == "user":
                segments.append((f"<|user|>\n{content}</s>\n", False))
            else:
                segments += [("<|assistant|>\n", False), (f"{content}</s>", True), ("\n", False)]
        if add_generation_prompt:
            segments.append(("<|assistant|>\n", False))
        return segments

    def stop_tokens(self) -> tuple[str, ...]:
        return ("</s>",)


class _Transcript(PromptStyle):
    """A plain-text transcript, one "Label: text" line per turn; the model answers after "<assistant_label>:"."""

    system_label = ""
    user_label = ""
    assistant_label = ""

    def render(self, system: str | None, turns: list[Turn], add_generation_prompt: bool) -> Segments:
        segments: Segments = []

        def new_line() -> str:
            return "\n" if segments else ""

        if system is not None:
            segments.append((f"{self.system_label} {system}" if self.system_label else system, False))
        for role, content in turns:
            if role == "user":
                segments.append((f"{new_line()}{self.user_label} {content}", False))
            else:
                segments += [(f"{new_line()}{self.assistant_label}", False), (f" {content}", True)]
        if add_generation_prompt:
            segments.append((f"{new_line()}{self.assistant_label}", False))
        return segments

    def stop_tokens(self) -> tuple[str, ...]:
        return (f"\n{self.user_label}",)


class Phi2(_Transcript):
    """phi-2's documented QA format, "Instruct: <prompt>\\nOutput:" (it has no chat template)."""

    name = "phi2"
    user_label = "Instruct:"
    assistant_label = "Output:"


class Falcon(_Transcript):
    """The Falcon chat format documented on the Falcon-180B-chat card: System: / User: / Falcon: lines."""

    name = "falcon"
    system_label = "System:"
    user_label = "User:"
    assistant_label = "Falcon:"


prompt_styles: dict[str, type[PromptStyle]] = {
    style.name: style
    for style in (PromptStyle, Alpaca, ChatML, Llama2, Llama3, Llama31, Mistral, MistralV03, Phi2, Phi3, Falcon, Zephyr)
}

# First match wins, so the more specific names come first.
_STYLE_BY_MODEL_NAME = (
    (r"llama-2-.*chat", "llama2"),
    (r"llama-3\.\d+-.*instruct", "llama3.1"),
    (r"llama-3-.*instruct", "llama3"),
    (r"mistral-7b-instruct-v0\.3", "mistral-v0.3"),
    (r"(mistral|mixtral)-.*instruct", "mistral"),
    (r"^phi-2", "phi2"),
    (r"^phi-3", "phi3"),
    (r"^falcon-.*-(instruct|chat)", "falcon"),
    (r"^tinyllama-.*-chat|zephyr", "zephyr"),
    (r"^smollm2-.*-instruct", "chatml"),
)


def detect_from_chat_template(template: str) -> str | None:
    """The prompt style whose output a tokenizer_config.json `chat_template` produces, recognised by its
    markers; None for a family we have no style for."""
    if "<|im_start|>" in template:
        return None if "<|im_sep|>" in template else "chatml"
    if "<|start_header_id|>" in template:
        return "llama3.1" if "Cutting Knowledge Date" in template else "llama3"
    if "<<SYS>>" in template:
        return "llama2"
    if "[INST]" in template:
        if "[SYSTEM_PROMPT]" in template:
            return None
        if "loop.last and system_message" in template:
            # v3 writes "[INST] " + content; the Tekken (Nemo) variant writes "[INST]" + content, which we lack.
            return "mistral-v0.3" if re.search(r"""["']\[INST\] ["']""", template) else None
        return "mistral"
    if "<|assistant|>" in template:
        return "phi3" if "<|end|>" in template else "zephyr"
    if "Falcon:" in template:
        return "falcon"
    return None


def _chatml_default_system(template: str) -> str | None:
    """The system prompt a ChatML template writes when the conversation has none (SmolLM2, Qwen2, ...)."""
    match = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]+?)<\|im_end\|>", template)
    if match is None:
        return None
    return match.group(1).replace("\\n", "\n")


def _read_chat_template(checkpoint_dir: Path) -> str | None:
    jinja_file = checkpoint_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = checkpoint_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    if isinstance(template, list):
        # Older tokenizers store several named templates; "default" is the chat one.
        templates = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = templates.get("default")
    return template if isinstance(template, str) else None


def has_prompt_style(checkpoint_dir: Path | str) -> bool:
    return (Path(checkpoint_dir) / PROMPT_STYLE_FILE).is_file()


def load_prompt_style(checkpoint_dir: Path | str) -> PromptStyle:
    """The checkpoint's prompt style: prompt_style.yaml if there is one, else recognised from the chat
    template (chat_template.jinja or tokenizer_config.json), else "default"."""
    checkpoint_dir = Path(checkpoint_dir)
    style_file = checkpoint_dir / PROMPT_STYLE_FILE
    if style_file.is_file():
        try:
            saved = yaml.safe_load(style_file.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{style_file} is not valid YAML: {error}") from error
        if not isinstance(saved, dict) or not isinstance(saved.get("name"), str):
            raise ValueError(
                f"{style_file} must hold `name: <style>` (one of {', '.join(prompt_styles)}), got {saved!r}"
            )
        if saved["name"] not in prompt_styles:
            raise ValueError(
                f"{style_file}: unknown prompt style {saved['name']!r}. Valid names: {', '.join(prompt_styles)}"
            )
        style = prompt_styles[saved["name"]]()
        if "default_system" in saved:
            default_system = saved["default_system"]
            if default_system is not None and not isinstance(default_system, str):
                raise ValueError(f"{style_file}: `default_system` must be a string or null, got {default_system!r}")
            style.default_system = default_system
        return style
    template = _read_chat_template(checkpoint_dir)
    name = detect_from_chat_template(template) if template else None
    if name is None:
        return PromptStyle()
    if name == "chatml":
        return ChatML(default_system=_chatml_default_system(template))
    return PromptStyle.from_name(name)


def save_prompt_style(style: PromptStyle | str, checkpoint_dir: Path | str) -> None:
    """Write prompt_style.yaml (via a temporary file and a rename, so it is never half written)."""
    if isinstance(style, str):
        style = PromptStyle.from_name(style)
    path = Path(checkpoint_dir) / PROMPT_STYLE_FILE
    saved = {"name": style.name, "default_system": style.default_system}
    atomic_write_text(path, yaml.safe_dump(saved, sort_keys=False, allow_unicode=True))
