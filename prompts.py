"""Prompt formats: conversation turns -> token ids and the mask of supervised (trained) tokens.

    formatter = make_prompt_formatter("qwen", tokenizer)  # NeMo's format names, or "chat_template"
    encoded = formatter.encode_dialog([{"role": "user", "content": "Say: <|audioplaceholder|>"},
                                       {"role": "assistant", "content": "hello"}])
    encoded["input_ids"], encoded["mask"]                  # (L,) token ids, (L,) True where trained

The formats are NeMo's (nemo.collections.common.prompts: the same text, the same supervised
tokens), written as one table (PROMPT_FORMATS) and one formatter; `chat_template` (ours) uses the
tokenizer's own Hugging Face chat template. Two differences from NeMo: qwen3's /think and /no_think
tags are placed by a generator seeded with the conversation's text (NeMo draws from Python's global
`random`), so a resumed run and every data worker see the same prompts and a conversation gets the
same placement each epoch; and a llama2 system prompt is one system_and_user turn (NeMo's llama2
data path repeats it as a user message when it comes from a tag or a manifest field).
"""
import random
import re
import zlib

import torch
from torch import Tensor

ROLES = ("system", "user", "assistant")

_LLAMA3 = "<|start_header_id|>{}<|end_header_id|>\n\n"
_QWEN = "<|im_start|>{}\n"
_QWEN_TURNS = {role: _QWEN.format(role) + "|message|<|im_end|>\n" for role in ROLES}
_NEMOTRON = "\n<SPECIAL_11>{}\n"
# NeMo's prompt formats (nemo.collections.common.prompts) by name: a template per role whose
# |message| (llama2's system_and_user: also |system|) takes the turn's text; |bos| / |eos| at a
# template's edges are the tokenizer's BOS / EOS ids. Each turn is tokenised on its own. Assistant
# turns are supervised, their whole template (llama3, qwen, nemotron-h: the header too). Other keys:
#   preamble   text put first             prefix  put after a prompt that awaits its answer
#   bos, eos   NeMo's INSERT_BOS / INSERT_EOS (eos closes the last answer, supervised)
#   last_only  only the last answer is supervised     tokens  must be single tokens of the tokenizer
PROMPT_FORMATS = {
    "llama2": dict(system_and_user="|bos|[INST] <<SYS>>\n|system|\n<</SYS>>\n\n|message| [/INST]",
                   user="|bos|[INST] |message| [/INST]", assistant="|message| |eos|"),
    "llama3": dict(**{role: _LLAMA3.format(role) + "|message|<|eot_id|>" for role in ROLES},
                   preamble="<|begin_of_text|>", prefix=_LLAMA3.format("assistant"),
                   tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eot_id|>")),
    "qwen": dict(user=_QWEN_TURNS["user"], assistant=_QWEN_TURNS["assistant"],
                 prefix=_QWEN.format("assistant"), tokens=("<|im_start|>", "<|im_end|>")),
    "qwen3": dict(**_QWEN_TURNS, prefix=_QWEN.format("assistant"), last_only=True,
                  tokens=("<|im_start|>", "<|im_end|>", "<think>", "</think>")),
    "gemma": dict(user="<start_of_turn>user\n|message|<end_of_turn>\n<start_of_turn>model\n",
                  assistant="|message|<end_of_turn>\n", bos=True, eos=True,
                  tokens=("<start_of_turn>", "<end_of_turn>")),
    "mistral": dict(preamble="<s>", user="[INST] |message| [/INST] ", assistant="|message|</s>",
                    tokens=("<s>", "</s>")),
    "plain": dict(user="|message|", assistant="|message|"),
    "phi2_qa": dict(user="Instruct: |message|\nOutput: ", assistant="|message|"),
    "phi2_chat": dict(user="Human: |message|\nAI: ", assistant="|message|"),
    "phi2_code": dict(user="|message|\n", assistant="|message|"),
    "nemotron-h": dict(system="<SPECIAL_10>System\n|message|",
                       user=_NEMOTRON.format("User") + "|message|",
                       assistant=_NEMOTRON.format("Assistant") + "|message|",
                       prefix=_NEMOTRON.format("Assistant"),
                       tokens=("<SPECIAL_10>", "<SPECIAL_11>")),
}
SYSTEM_FORMATS = [n for n, f in PROMPT_FORMATS.items() if {*f} & {"system", "system_and_user"}]
QWEN3_NO_THINK = "<think>\n\n</think>\n\n"  # qwen3: the empty reasoning of an answer without one


def make_prompt_formatter(name: str, tokenizer):
    """The formatter of `prompt_format` `name` for `tokenizer` (a Hugging Face tokenizer)."""
    if name == "chat_template":
        return ChatTemplatePromptFormatter(tokenizer)
    if name not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt_format '{name}': use one of {', '.join(PROMPT_FORMATS)} "
                         "or chat_template (the LLM's own chat template)")
    return PromptFormatter(name, tokenizer)


class PromptFormatter:
    """A NeMo prompt format of PROMPT_FORMATS: turns -> token ids and mask of supervised tokens."""

    def __init__(self, name: str, tokenizer) -> None:
        self.name, self.format, self.tokenizer = name, PROMPT_FORMATS[name], tokenizer
        missing = [t for t in self.format.get("tokens", ()) if len(_encode(tokenizer, t)) != 1]
        if missing:
            raise ValueError(f"prompt_format {name} needs {', '.join(missing)} as single tokens, "
                             "which this LLM's tokenizer lacks: use the prompt_format of this LLM")

    def encode_dialog(self, turns: list[dict], rng: random.Random | None = None) -> dict:
        """`rng` places qwen3's /think and /no_think tags (default: seeded with the turns' text)."""
        turns = merge_turns(turns)
        if self.name == "qwen3":
            turns = qwen3_thinking(turns, rng or random.Random(zlib.crc32(repr(turns).encode())))
        fmt, answered = self.format, turns[-1]["role"] == "assistant"
        pieces = [([self.tokenizer.bos_token_id], False)] if fmt.get("bos") else []
        if "preamble" in fmt:
            pieces.append((self._fill(fmt["preamble"], {}), False))
        template_turns = self._template_turns(turns)
        for i, (role, slots) in enumerate(template_turns):
            last = i == len(template_turns) - 1
            supervised = role == "assistant" and (last or not fmt.get("last_only"))
            pieces.append((self._fill(fmt[role], slots), supervised))
        if not answered and "prefix" in fmt:
            pieces.append((self._fill(fmt["prefix"], {}), False))
        if answered and fmt.get("eos"):
            pieces.append(([self.tokenizer.eos_token_id], True))
        return _pack(pieces)

    def _template_turns(self, turns: list[dict]) -> list[tuple[str, dict]]:
        """(template, slots) per turn; llama2 folds a system turn into the user turn after it."""
        out, name = [], self.name
        alone = f"prompt_format {name}: a system turn must be followed by a user turn"
        for turn in turns:
            role, text = turn["role"], turn["content"]
            if out and out[-1][0] == "system_and_user" and "message" not in out[-1][1]:
                if role != "user":
                    raise ValueError(alone)
                out[-1][1]["message"] = text
            elif role in self.format:
                out.append((role, {"message": text}))
            elif role == "system" and "system_and_user" in self.format:
                out.append(("system_and_user", {"system": text}))
            else:
                raise ValueError(f"prompt_format {name} has no system role (as in NeMo): drop the "
                                 f"system prompt or use one of {', '.join(SYSTEM_FORMATS)}, "
                                 "chat_template")
        if out and "message" not in out[-1][1]:
            raise ValueError(alone)
        return out

    def _fill(self, template: str, slots: dict) -> list[int]:
        text = re.sub(r"\|(message|system)\|", lambda m: slots[m[1]], template)
        bos, eos = text.startswith("|bos|"), text.endswith("|eos|")
        ids = _encode(self.tokenizer, text.removeprefix("|bos|").removesuffix("|eos|"))
        return [self.tokenizer.bos_token_id] * bos + ids + [self.tokenizer.eos_token_id] * eos


class ChatTemplatePromptFormatter:
    """The tokenizer's own Hugging Face chat template, so any instruct LLM can be used.

    The rendered text is cut where each assistant turn starts (the end of the prompt rendered up to
    that turn with the generation prompt) and ends (the end of the conversation rendered through it,
    which includes the template's end-of-turn token); each piece is tokenised on its own, so
    training and generation prompts tokenise alike.
    """

    def __init__(self, tokenizer) -> None:
        if not tokenizer.chat_template:
            raise ValueError("prompt_format chat_template: the tokenizer has no chat_template; use "
                             "an instruct LLM or prompt_format: llama2")
        self.tokenizer = tokenizer

    def encode_dialog(self, turns: list[dict]) -> dict[str, Tensor]:
        turns = merge_turns(turns)
        full = self._render(turns, generation_prompt=turns[-1]["role"] != "assistant")
        cuts = [0]
        for i, turn in enumerate(turns):
            if turn["role"] == "assistant":
                before, through = self._render(turns[:i], True), self._render(turns[: i + 1], False)
                if not (through.startswith(before) and full.startswith(through)):
                    raise ValueError("prompt_format chat_template: this chat template renders a "
                                     "conversation differently from its prefixes, so assistant "
                                     "turns cannot be located")
                cuts += [len(before), len(through)]
        cuts.append(len(full))
        pieces = [(_encode(self.tokenizer, full[a:b]), k % 2 == 1)  # odd pieces: the answers
                  for k, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        return _pack(pieces)

    def _render(self, turns: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(turns, tokenize=False,
                                                  add_generation_prompt=generation_prompt)


def merge_turns(turns: list[dict]) -> list[dict]:
    """Normalise turns to {"role", "content"} and join consecutive same-role turns with one space.

    Accepts {"role", "content"} and NeMo's {"role", "slots": {"message"}} (also its
    "system_and_user" role with slots "system" and "message"); other keys (such as "audio") are
    ignored here.
    """
    flat = []
    for turn in turns:
        slots = turn.get("slots", {})
        if turn.get("role") == "system_and_user":
            flat += [("system", slots.get("system")), ("user", slots.get("message"))]
        else:
            flat.append((turn.get("role"), turn.get("content", slots.get("message"))))
    merged = []
    for role, text in flat:
        if role not in ROLES:
            raise ValueError(f"unknown turn role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(text, str):
            raise ValueError(f"a {role} turn needs its text as a string under 'content' "
                             f"(got {text!r})")
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += " " + text
        else:
            merged.append({"role": role, "content": text})
    if not merged:
        raise ValueError("empty conversation")
    return merged


def qwen3_thinking(turns: list[dict], rng: random.Random) -> list[dict]:
    """NeMo's qwen3 preparation of a conversation. Earlier answers lose their <think> block; the
    last answer keeps its own (normalised) or gets an empty one, and a /no_think tag (with real
    reasoning: /think, half the time) goes before or after one system or user turn. `rng` makes
    NeMo's draws from Python's `random`, call for call (the same seed gives NeMo's output)."""
    turns = [dict(turn) for turn in turns]
    for turn in turns[:-1]:
        if turn["role"] == "assistant" and "</think>" in turn["content"]:
            turn["content"] = turn["content"].split("</think>")[1].strip()
    last, tag = turns[-1], None
    if last["role"] == "assistant":
        text = last["content"]
        if "<think>" not in text and "</think>" not in text:
            last["content"], tag = QWEN3_NO_THINK + text, "/no_think"
        elif text.startswith("<think>") and "</think>" in text:
            reasoning = text.split("<think>")[1].split("</think>")[0].strip()
            answer = text.split("</think>")[1].lstrip("\n")
            last["content"] = f"<think>\n{reasoning}\n</think>\n\n{answer}"
            tag = "/no_think" if not reasoning else "/think" if rng.random() < 0.5 else None
        else:
            raise ValueError("prompt_format qwen3: an answer with reasoning starts with <think> "
                             "and holds </think>")
    asked = [turn for turn in turns if turn["role"] != "assistant"]
    if tag and asked:
        turn = rng.choice(asked)
        text = turn["content"]
        turn["content"] = f"{text} {tag}" if rng.random() < 0.5 else f"{tag} {text}"
    return turns[1:] if turns[0]["role"] == "system" and not turns[0]["content"].strip() else turns


# --------------------------------------------------------------------------------------------------
# helpers

def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pack(pieces: list[tuple[list[int], bool]]) -> dict[str, Tensor]:
    ids = [i for piece, _ in pieces for i in piece]
    mask = [is_assistant for piece, is_assistant in pieces for _ in piece]
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "mask": torch.tensor(mask, dtype=torch.bool)}
