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
        """The markers of a tokenizer (or a processor holding one): read from its chat template
        where it has one (:func:`template_markers`), else recognised from the vocabulary: ChatML
        where ``<|im_start|>`` is a token, or else LLaVA-1.5's "USER:" and "ASSISTANT:"."""
        if not _is_tokenizer(tokenizer):
            raise TypeError("ChatMarkers.from_tokenizer needs a tokenizer or a processor, "
                            f"got {type(tokenizer).__name__}")
        template = getattr(tokenizer, "chat_template", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        template = template or getattr(tokenizer, "chat_template", None)
        texts = template_markers(tokenizer, template) if template else None
        if texts is not None:
            return cls(**{role: _spellings(tokenizer, *found) for role, found in texts.items()})
        if CHATML_START in tokenizer.get_vocab():
            return cls(user=_spellings(tokenizer, f"{CHATML_START}user\n", f"{CHATML_START}user"),
                       assistant=_spellings(tokenizer, f"{CHATML_START}assistant\n", f"{CHATML_START}assistant"),
                       other=_spellings(tokenizer, f"{CHATML_END}\n", CHATML_END, f"{CHATML_START}system\n",
                                        f"{CHATML_START}system"))
        return cls(user=_spellings(tokenizer, "USER:"), assistant=_spellings(tokenizer, "ASSISTANT:"))


def _spellings(tokenizer: Any, *texts: str) -> Markers:
    """Each marker text as token ids, as it stands and stripped of the whitespace around it, each
    with and without a leading space (SentencePiece spells a word after a space differently)."""
    found = []
    for text in texts:
        for variant in dict.fromkeys((text, text.strip(), " " + text.strip())):
            ids = tuple(tokenizer.encode(variant, add_special_tokens=False)) if variant.strip() else ()
            if ids and ids not in found:
                found.append(ids)
    return tuple(found)


# sentinel words rendered through a chat template: what the template writes around them is its markers
_USER, _USER2, _ANSWER, _SYSTEM = "desapuserwordsone", "desapuserwordstwo", "desapanswerwords", "desapsystemwords"


def template_markers(tokenizer: Any, template: str) -> Optional[dict[str, tuple[str, ...]]]:
    """A chat template's markers as text, read by rendering conversations of sentinel words with it
    (``{"user": openers, "assistant": openers, "other": ...}``); None where the template does not
    render them (it needs arguments we cannot guess, or drops the words).

    - the generation prompt (the rendering with ``add_generation_prompt`` minus the one without)
      opens an assistant turn;
    - what follows an answer up to the next user's words is the answer's close and the user opener;
      the answer's close is what the template writes after a last answer;
    - what follows the user's words before an answer is the user turn's close and the opener;
    - a system message's opener and close never count, nor a default system prompt (it comes
      before the first user opener, in no user turn)."""
    def render(messages, generation: bool) -> Optional[str]:
        for as_parts in (True, False):
            conversation = [{"role": role, "content": [{"type": "text", "text": text}] if as_parts else text}
                            for role, text in messages]
            try:
                rendered = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                         add_generation_prompt=generation)
            except Exception:   # a template that wants other arguments: try the other content form
                continue
            if isinstance(rendered, str) and all(text in rendered for _, text in messages):
                return rendered
        return None

    one, one_asked = render([("user", _USER)], False), render([("user", _USER)], True)
    answered = render([("user", _USER), ("assistant", _ANSWER)], False)
    two = render([("user", _USER), ("assistant", _ANSWER), ("user", _USER2)], False)
    if None in (one, one_asked, answered, two) or not one_asked.startswith(one):
        return None
    assistant = one_asked[len(one):]
    answer_close = answered[answered.index(_ANSWER) + len(_ANSWER):]
    between = two[two.index(_ANSWER) + len(_ANSWER):two.index(_USER2)]
    user = between[len(answer_close):] if between.startswith(answer_close) else between
    user_close = answered[answered.index(_USER) + len(_USER):answered.index(_ANSWER)]
    if user_close.rstrip().endswith(assistant.strip()):
        user_close = user_close.rstrip()[:len(user_close.rstrip()) - len(assistant.strip())]
    other = [user_close, answer_close]
    system = render([("system", _SYSTEM), ("user", _USER)], False)
    if system is not None:
        other += [system[:system.index(_SYSTEM)],
                  system[system.index(_SYSTEM) + len(_SYSTEM):system.index(_USER)].removesuffix(user)]
    if not (user.strip() and assistant.strip()):
        return None
    roles = {user.strip(), assistant.strip()}   # a template without a system role writes it as a turn
    return {"user": (user,), "assistant": (assistant,),
            "other": tuple(dict.fromkeys(t for t in other if t.strip() and t.strip() not in roles))}


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
