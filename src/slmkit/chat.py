"""The plain-text chat template: how `slm chat` and `slm serve`'s /v1/chat/completions turn a
conversation into a prompt for a base model.

slmkit's models are base models: they continue text and know no chat format. A conversation is
therefore written as a transcript that such a model can go on with, and its reply ends where it
starts the next turn by itself:

    <system message, if any>

    User: <message>
    Assistant: <reply>
    User: <message>
    Assistant:

The reply is what the model writes after the last "Assistant:", up to the first "\\nUser:" (a stop
string) or the end-of-text token. Any other text model (a char model trained on plays, say) makes
up its own turns in its own style; the template only frames them.
"""

from __future__ import annotations

from slmkit.errors import UserError, show

ROLES = ("system", "user", "assistant")
SPEAKERS = {"user": "User", "assistant": "Assistant"}
# The reply ends where the model begins the user's next turn.
TURN_STOPS = ("\nUser:",)


def render_chat(messages: list[dict[str, str]]) -> str:
    """The transcript of `messages` (each {"role": ..., "content": ...}), ending with "Assistant:"
    for the model to continue. System messages open the transcript, each followed by a blank line."""
    if not messages:
        raise UserError("a chat needs at least one message")
    system, turns = [], []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"a message's role must be one of {', '.join(ROLES)}, got {show(role)}")
        if not isinstance(content, str):
            raise UserError(f"a message's content must be a string, got {show(content)}")
        if role == "system":
            system.append(content.strip() + "\n\n")
        else:
            turns.append(f"{SPEAKERS[role]}: {content.strip()}\n")
    return "".join(system) + "".join(turns) + f"{SPEAKERS['assistant']}:"
