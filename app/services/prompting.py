"""The chat prompt, split into a reusable document prefix and a per-question suffix.

Layout (the documents come first so their processed state can be reused by every question):

    system: <instructions>
    user:   Documents:\n\n<documents with [Page N] markers>\n\n[End of documents]\n  <- prefix ends here
            Question: <first question>
    assistant: <answer>
    user: <next question> ...
    assistant:                                                                          <- generation prompt

The prefix is the chat template rendered up to the end of the documents text; the suffix is the rest. Both are
tokenised separately; `check()` verifies that prefix + suffix tokens equal the tokens of the whole rendered
conversation (so the model sees exactly what a single-shot prompt would give).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROMPT_VERSION = "1"  # bump when the layout changes: it is part of the state cache key
SENTINEL = "\ue000AHN-PREFIX-END\ue000"  # a private-use marker that never occurs in extracted text
DEFAULT_SYSTEM_PROMPT = (
    "You are a careful assistant that answers questions about the documents the user provides. "
    "Base your answers on the documents. Each page starts with a marker like [Page 12]; cite the pages you "
    "use in the same form, for example [Page 12]. If the documents do not contain the answer, say so."
)
NO_DOCUMENTS = "(no documents)"


def documents_block(documents_text: str) -> str:
    return f"Documents:\n\n{documents_text or NO_DOCUMENTS}\n\n[End of documents]\n"


def question_block(question: str) -> str:
    return f"Question: {question}"


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str


class PromptBuilder:
    """Renders and tokenises prompts with a Hugging Face tokenizer and its chat template."""

    def __init__(self, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot be used for chat")
        self.tok = tokenizer
        self.system_prompt = system_prompt

    # ---- rendering ----------------------------------------------------------------------------------------
    def _messages(self, documents_text: str, turns: list[Turn]) -> list[dict]:
        """turns: user/assistant alternating, starting with the first question (user)."""
        msgs = [{"role": "system", "content": self.system_prompt}]
        for i, t in enumerate(turns):
            content = t.content
            if i == 0:
                content = documents_block(documents_text) + question_block(t.content)
            msgs.append({"role": t.role, "content": content})
        return msgs

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        return "\n\n".join(m["content"] for m in messages)  # as ahn_runtime.generate.chat_ids does

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prefix_text(self, documents_text: str) -> str:
        msgs = self._messages(documents_text, [Turn("user", SENTINEL)])
        # the sentinel stands where the question block starts
        msgs[1]["content"] = documents_block(documents_text) + SENTINEL
        rendered = self.render(msgs, add_generation_prompt=False)
        if rendered.count(SENTINEL) != 1:
            raise ValueError("the chat template does not keep the user message intact")
        return rendered.split(SENTINEL)[0]

    def conversation_text(self, documents_text: str, turns: list[Turn]) -> str:
        return self.render(self._messages(documents_text, turns), add_generation_prompt=True)

    # ---- token ids ----------------------------------------------------------------------------------------
    def prefix_ids(self, documents_text: str) -> list[int]:
        return self.encode(self.prefix_text(documents_text))

    def suffix_ids(self, documents_text: str, turns: list[Turn]) -> list[int]:
        """Tokens after the document prefix: the first question, earlier turns, the generation prompt."""
        prefix = self.prefix_text(documents_text)
        full = self.conversation_text(documents_text, turns)
        if not full.startswith(prefix):
            raise ValueError("the chat template renders the documents differently with a question after them")
        return self.encode(full[len(prefix):])

    def check(self, documents_text: str, turns: list[Turn]) -> bool:
        """True if prefix + suffix tokens equal the tokens of the whole conversation."""
        prefix, full = self.prefix_text(documents_text), self.conversation_text(documents_text, turns)
        ok = self.encode(prefix) + self.encode(full[len(prefix):]) == self.encode(full)
        if not ok:
            log.warning("prefix/suffix tokenisation differs from whole-prompt tokenisation at the boundary")
        return ok
