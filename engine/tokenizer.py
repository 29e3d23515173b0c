"""The broker's text side: prompt (text, ids or chat) to token ids, and token ids to text.

Uses the model's own tokenizer and chat template through transformers' tokenizer classes; it
never loads model weights (and never imports torch itself).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine import protocol as p
from engine.errors import SubmitError


class TextCodec:
    def __init__(self, tokenizer, max_context_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_context_len = max_context_len
        self.vocab_size = len(tokenizer)

    @classmethod
    def load(cls, model_spec: str) -> TextCodec:
        from engine.models import load_tokenizer, resolve_model

        spec = resolve_model(model_spec)
        tokenizer = load_tokenizer(spec)
        config = _load_config(spec)
        max_len = getattr(config, "max_position_embeddings", None) or 2**31 - 1
        codec = cls(tokenizer, int(max_len))
        codec.vocab_size = max(codec.vocab_size, int(getattr(config, "vocab_size", 0) or 0))
        return codec

    def encode_prompt(self, msg: p.Submit) -> list[int]:
        """Token ids of the prompt as given: text, ids, or chat messages (chat template)."""
        if msg.prompt_ids is not None:
            return list(msg.prompt_ids)
        if msg.messages is not None:
            return self._apply_chat_template(msg.messages)
        assert msg.prompt is not None
        return list(self.tokenizer.encode(msg.prompt, add_special_tokens=False))

    def _apply_chat_template(self, messages: list[p.ChatMessage]) -> list[int]:
        if not messages:
            raise SubmitError("invalid_request", "messages is empty: send at least one message")
        if self.tokenizer.chat_template is None:
            raise SubmitError(
                "invalid_request",
                "this model has no chat template: send a prompt instead of messages",
            )
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            out = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # a template may reject a role order; say so to the client
            raise SubmitError(
                "invalid_request", f"the chat template rejected these messages: {exc}"
            ) from None
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _load_config(spec):
    """The model's transformers config (context length, vocabulary), without weights."""
    from transformers import AutoConfig

    ready = spec.ready_dir()
    if ready is not None:
        return AutoConfig.from_pretrained(ready)
    return AutoConfig.from_pretrained(spec.gguf_file.parent, gguf_file=spec.gguf_file.name)
