"""Rendering conversations into model input text with the tokenizer's chat template.

Every stage renders prompts through `render_chat`, so SFT trains on exactly the prefix
that generation, PPO and evaluation later feed the model. The system prompt is always
explicit: SmolLM2's template inserts its own default system message when none is
given, which would silently differ between stages that pass one and stages that don't.
"""

from __future__ import annotations

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
