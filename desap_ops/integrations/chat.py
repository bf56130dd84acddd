"""Chat-template markers: which tokens of a templated prompt are the user's own words.

A chat template wraps the user's request in role words and turn ends, and a multi-turn prompt
also holds the model's earlier answers. None of these ask anything of the image, yet each would
weigh as much as the question in the max over text tokens. :class:`ChatMarkers` names the
template's markers as token-id sequences (only a tokenizer knows them), and :func:`user_text`
keeps what the user said: every token outside a marker and outside an assistant turn (from an
assistant-turn opener up to the next user-turn opener, or to the end of the row).
:func:`user_turns` numbers those words by turn: an image's text is its own turn's words, so what
an image keeps does not change as the conversation goes on (and vLLM's caches of it stay valid).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch

Markers = tuple[tuple[int, ...], ...]

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


def _as_markers(name: str, value: Iterable) -> Markers:
    """``value`` as a tuple of non-empty tuples of ints, or an error naming the field."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"ChatMarkers.{name} must be a sequence of token-id sequences, got {type(value).__name__}")
    markers = []
    for marker in value:
        if isinstance(marker, (str, bytes)) or not isinstance(marker, Iterable):
            raise TypeError(f"ChatMarkers.{name} must hold token-id sequences, got {marker!r}")
        ids = tuple(marker)
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"ChatMarkers.{name} must hold non-empty sequences of int token ids, got {marker!r}")
        markers.append(ids)
    return tuple(markers)


@dataclass(frozen=True)
class ChatMarkers:
    """A chat template's markers, each a token-id sequence (a marker may have several spellings).

    - ``user``: user-turn openers ("USER:", "<|im_start|>user\\n"); a user turn's words count.
    - ``assistant``: assistant-turn openers ("ASSISTANT:", "<|im_start|>assistant\\n"); the turn
      they open, up to the next user-turn opener, does not count.
    - ``other``: further markers that never count (turn ends, system openers).
    """

    user: Markers
    assistant: Markers
    other: Markers = ()

    def __post_init__(self) -> None:
        for name in ("user", "assistant", "other"):
            object.__setattr__(self, name, _as_markers(name, getattr(self, name)))

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatMarkers":
        """The markers of the two template styles, recognised from the vocabulary: ChatML
        (Qwen2.5-VL: ``<|im_start|>`` is a token) or else LLaVA-1.5 ("USER:", "ASSISTANT:"
        written as plain text). Takes a tokenizer or a processor holding one."""
        if not _is_tokenizer(tokenizer):
            raise TypeError("ChatMarkers.from_tokenizer needs a tokenizer or a processor, "
                            f"got {type(tokenizer).__name__}")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

        def spellings(*texts: str) -> Markers:
            # each text on its own, with and without a leading space (SentencePiece spells them
            # differently); the template's newline after a marker belongs to the marker
            found = []
            for text in texts:
                for variant in (text, " " + text):
                    ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
                    if ids and ids not in found:
                        found.append(ids)
            return tuple(found)

        if CHATML_START in tokenizer.get_vocab():
            def opener(role: str) -> Markers:
                return spellings(f"{CHATML_START}{role}\n", f"{CHATML_START}{role}")

            return cls(user=opener("user"), assistant=opener("assistant"),
                       other=spellings(f"{CHATML_END}\n", CHATML_END) + opener("system"))
        return cls(user=spellings("USER:"), assistant=spellings("ASSISTANT:"))


def _is_tokenizer(value: Any) -> bool:
    """A tokenizer, or a processor holding one (what :meth:`ChatMarkers.from_tokenizer` reads)."""
    tokenizer = getattr(value, "tokenizer", value)
    return callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "get_vocab", None))


def as_chat_markers(chat: Union[ChatMarkers, Any, None]) -> Optional[ChatMarkers]:
    """apply_desap's ``chat``: None, a :class:`ChatMarkers`, or a tokenizer or processor to read
    them from (:meth:`ChatMarkers.from_tokenizer`)."""
    if chat is None or isinstance(chat, ChatMarkers):
        return chat
    if not _is_tokenizer(chat):
        raise TypeError(f"chat must be None, a ChatMarkers, a tokenizer or a processor, got {type(chat).__name__}")
    return ChatMarkers.from_tokenizer(chat)


def find_markers(input_ids: torch.Tensor, markers: Markers) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, covered), both (B, T) bool: where any of ``markers`` begins, and every position
    inside a match. One comparison over all windows per marker, no loop over tokens."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    covered = torch.zeros_like(starts)
    width = input_ids.shape[1]
    for marker in markers:
        size = len(marker)
        if size > width:
            continue
        pattern = torch.tensor(marker, dtype=input_ids.dtype, device=input_ids.device)
        hits = (input_ids.unfold(1, size, 1) == pattern).all(dim=-1)    # (B, T - size + 1)
        starts[:, :hits.shape[1]] |= hits
        for offset in range(size):
            covered[:, offset:offset + hits.shape[1]] |= hits
    return starts, covered


def user_text(input_ids: torch.Tensor, chat: ChatMarkers) -> torch.Tensor:
    """(B, T) bool: True where a token is the user's (outside every marker and every assistant
    turn). An assistant turn runs from its opener to the next user-turn opener or the end of
    the row, so the closing generation prompt ("ASSISTANT:") is dropped with the answers."""
    return user_turns(input_ids, chat) >= 0


def user_turns(input_ids: torch.Tensor, chat: ChatMarkers) -> torch.Tensor:
    """(B, T) int64: for each of the user's words (:func:`user_text`), the number of its user
    turn (how many user-turn openers precede it; 0 before the first), and -1 elsewhere. An image's
    text is the words of its own turn (``sequence.image_text_tokens``)."""
    user_starts, user_marks = find_markers(input_ids, chat.user)
    answer_starts, answer_marks = find_markers(input_ids, chat.assistant)
    _, other_marks = find_markers(input_ids, chat.other)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_user = torch.where(user_starts, positions, -1).cummax(dim=1).values
    last_answer = torch.where(answer_starts, positions, -1).cummax(dim=1).values
    in_answer = last_answer > last_user
    words = ~(in_answer | user_marks | answer_marks | other_marks)
    return torch.where(words, user_starts.long().cumsum(dim=1), -1)
