"""Rendering conversations into model input text with the tokenizer's chat template.

Every stage renders prompts through `render_chat`, so SFT trains on exactly the prefix
that generation, PPO and evaluation later feed the model. The system prompt is always
explicit: SmolLM2's template inserts its own default system message when none is
given, which would silently differ between stages that pass one and stages that don't.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

Message = dict[str, str]


def with_system(messages: Sequence[Message], system_prompt: str | None) -> list[Message]:
    """Prepend a system message unless the conversation already starts with one."""
    messages = list(messages)
    if system_prompt is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_chat(
    tokenizer,
    messages: Sequence[Message],
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` to text; ends with the assistant header when asked.

    Tokenizers without a chat template (base models) get the hh-rlhf transcript format
    (``\\n\\nHuman: ...\\n\\nAssistant: ...``).
    """
    full = with_system(messages, system_prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            full, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    parts = []
    for message in full:
        role = {"user": "Human", "assistant": "Assistant", "system": "System"}[message["role"]]
        parts.append(f"\n\n{role}: {message['content']}")
    if add_generation_prompt:
        parts.append("\n\nAssistant:")
    return "".join(parts)


def end_of_turn(tokenizer) -> str:
    """The text that closes an assistant turn in the chat format (e.g. ``<|im_end|>``)."""
    return tokenizer.eos_token or ""


# Marks the part `template_with_system_prompt` adds, so a re-export replaces it.
_SYSTEM_PROMPT_BEGIN = "{#- ucai: the trained system prompt, where none is given -#}"
# Ends in an expression, not a tag: transformers renders with trim_blocks, which would
# drop a newline that starts the template right after a tag.
_SYSTEM_PROMPT_END = "{#- ucai: end #}{{ '' }}"


def template_with_system_prompt(template: str, system_prompt: str) -> str:
    """``template`` with ``system_prompt`` put first in a conversation that does not
    start with a system message, as every ucai stage renders one (`with_system`).

    An exported model then answers ``apply_chat_template([user message])`` as it was
    trained and evaluated, rather than after the template's own default system message
    (SmolLM2's names the model and its maker). A template given one before gets the new
    one instead."""
    if _SYSTEM_PROMPT_BEGIN in template and _SYSTEM_PROMPT_END in template:
        template = template.split(_SYSTEM_PROMPT_END, 1)[1]
    literal = json.dumps(system_prompt, ensure_ascii=False)  # a JSON string is a Jinja string literal
    return (
        f"{_SYSTEM_PROMPT_BEGIN}{{%- if not messages or messages[0]['role'] != 'system' %}}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}{{%- endif %}}"
        f"{_SYSTEM_PROMPT_END}{template}"
    )


def tokenizer_for_export(tokenizer, system_prompt: str | None):
    """A copy of ``tokenizer`` to save beside a trained model: its chat template defaults
    to ``system_prompt`` (`template_with_system_prompt`). The tokenizer itself, where
    the stages rendered without a system prompt (null: the template's own) or where
    it has no chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if system_prompt is None or not template:
        return tokenizer
    exported = copy.copy(tokenizer)  # the training tokenizer keeps its template
    if isinstance(template, dict):  # named templates ("default", "tool_use"): each one
        exported.chat_template = {name: template_with_system_prompt(text, system_prompt) for name, text in template.items()}
    else:
        exported.chat_template = template_with_system_prompt(template, system_prompt)
    return exported
