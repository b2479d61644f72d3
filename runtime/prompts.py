"""Prompt templates and the `<image>` split, as the original LLaVA repo builds them.

A question becomes text by a named template (`render_prompt`), then token chunks with the
images between them (`tokenize_prompt`): the prompt is split on the literal `<image>`, each text
chunk is tokenized on its own without special tokens, and BOS goes only at the very start. That
is the id sequence of the original `tokenizer_image_token`, which tokenizes every chunk with BOS
and strips it from all but the first. No image token id has to exist in the vocabulary.

A conversation (alternating user and assistant `Turn`s, for an OpenAI-style server) becomes
text by `render_conversation`; `render_prompt` is its one-user-turn case.

Templates follow haotian-liu/LLaVA `llava/conversation.py` (`Conversation.get_prompt`, ending
with an open assistant turn); `chatml` is LLaVA-NeXT's `conv_qwen`. Runtime module:
`tokenizers` and (for tokenizer chat templates only) jinja2, never torch or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.errors import PromptError

if TYPE_CHECKING:
    import jinja2
    import tokenizers

IMAGE_PLACEHOLDER = "<image>"
CHAT = "chat"  # the tokenizer's own chat_template (jinja)
USER = "user"
ASSISTANT = "assistant"

# Separator styles of llava/conversation.py (SeparatorStyle), plus LLaVA-NeXT's CHATML.
TWO = "two"  # vicuna: system SEP role: msg SEP role: msg SEP2 ... role:
LLAMA_2 = "llama_2"  # [INST] <<SYS>>...<</SYS>> msg [/INST] answer SEP2 SEP[INST] msg [/INST]
MPT = "mpt"  # system SEP role msg SEP ... role  (roles carry their own markup)
CHATML = "chatml"  # system SEP\n role\n msg SEP\n ... role\n
PLAIN = "plain"  # the question as it is


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: `role` is "user" or "assistant"; `text` holds an
    `<image>` placeholder where each of its images stands."""

    role: str
    text: str


def check_turns(turns: list[Turn]) -> None:
    """PromptError unless the turns alternate user, assistant, ..., user: the prompt must end
    where the next answer begins, and every template assumes a user turn first."""
    for number, turn in enumerate(turns, 1):
        if turn.role not in (USER, ASSISTANT):
            raise PromptError(
                f"turn {number} has the unknown role {turn.role!r}; a turn is {USER!r} or {ASSISTANT!r}"
            )
    if not turns:
        raise PromptError("a conversation needs at least one user turn")
    if turns[0].role != USER:
        raise PromptError(f"a conversation starts with a {USER!r} turn, not {turns[0].role!r}")
    for number, (before, after) in enumerate(zip(turns, turns[1:]), 1):
        if before.role == after.role:
            raise PromptError(
                f"turns {number} and {number + 1} are both {after.role!r}; user and assistant turns alternate"
            )
    if turns[-1].role != USER:
        raise PromptError(
            f"a conversation ends with a {USER!r} turn for the assistant to answer, not {ASSISTANT!r}"
        )


@dataclass(frozen=True)
class Template:
    """One conversation format: `render_turns(turns)` is the prompt up to where the next answer begins.

    `system_role` is the markup in front of the system prompt, as `roles` carry theirs (ChatML's
    "<|im_start|>system"), so that an OpenAI system message replaces the prompt, not the markup.
    """

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = ""
    sep2: str | None = None
    system_role: str = ""

    def render(self, message: str) -> str:
        """The prompt for one user message."""
        return self.render_turns([Turn(USER, message)])

    def render_turns(self, turns: list[Turn], system: str | None = None) -> str:
        """The prompt for alternating turns (user first and last), as upstream's get_prompt writes
        them followed by the open assistant turn. `system` None keeps this template's system prompt."""
        check_turns(turns)
        system = self.system if system is None else system
        if self.style == TWO:
            return self._render_two(turns, system)
        if self.style == LLAMA_2:
            return self._render_llama_2(turns, system)
        if self.style == MPT:
            return self._render_mpt(turns, system)
        if self.style == CHATML:
            return self._render_chatml(turns, system)
        if self.style == PLAIN:
            # Upstream writes message + sep ("\n") per user turn, + sep2 (None: a TypeError) per
            # answer. One turn stays the question as it is; several are joined with "\n".
            return "\n".join(turn.text for turn in turns)
        raise PromptError(f"template {self.name!r} has an unknown style {self.style!r}")

    def _role(self, turn: Turn) -> str:
        return self.roles[0] if turn.role == USER else self.roles[1]

    def _render_two(self, turns: list[Turn], system: str) -> str:
        # system + sep, then "role: message" + sep after a user turn, + sep2 after an answer
        seps = (self.sep, self.sep2)
        body = "".join(f"{self._role(turn)}: {turn.text}{seps[i % 2]}" for i, turn in enumerate(turns))
        return f"{system}{self.sep}{body}{self.roles[1]}:"

    def _render_llama_2(self, turns: list[Turn], system: str) -> str:
        # wrap_sys on the first message only, and only when there is a system message
        # (upstream's later `if len(msg) > 0`)
        wrapped_system = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        text = ""
        for i, turn in enumerate(turns):
            if turn.role == USER:
                text += f"{self.sep}[INST] {wrapped_system if i == 0 else ''}{turn.text} [/INST]"
            else:
                text += f" {turn.text} {self.sep2}"
        # upstream prepends sep, then lstrip(sep): a character set, and "[" is never in it
        return text.lstrip(self.sep)

    def _render_mpt(self, turns: list[Turn], system: str) -> str:
        body = "".join(f"{self._role(turn)}{turn.text}{self.sep}" for turn in turns)
        return f"{self.system_role}{system}{self.sep}{body}{self.roles[1]}"

    def _render_chatml(self, turns: list[Turn], system: str) -> str:
        head = "" if system == "" else f"{self.system_role}\n{system}{self.sep}\n"
        body = "".join(f"{self._role(turn)}\n{turn.text}{self.sep}\n" for turn in turns)
        return f"{head}{body}{self.roles[1]}\n"


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        # conv_vicuna_v1: LLaVA-1.5's training format (--version v1) and its eval scripts' --conv-mode.
        Template("vicuna_v1", TWO, _VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
        # conv_llava_v1: same separators, "human" system prompt; run_llava.py's pick for "v1" models.
        Template("llava_v1", TWO, _LLAVA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>"),
        Template(
            "llava_llama_2",
            LLAMA_2,
            "You are a helpful language and vision assistant. "
            "You are able to understand the visual content that the user provides, "
            "and assist the user with a variety of tasks using natural language.",
            ("USER", "ASSISTANT"),
            "<s>",
            "</s>",
        ),
        Template("mistral_instruct", LLAMA_2, "", ("USER", "ASSISTANT"), "", "</s>"),
        # conv_chatml_direct (LLaVA-1.6-34B): no newline after <|im_end|>, as upstream writes it.
        Template(
            "chatml_direct",
            MPT,
            "Answer the questions.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "<|im_end|>",
            system_role="<|im_start|>system\n",
        ),
        # LLaVA-NeXT's conv_qwen: Qwen's own ChatML (newline after every <|im_end|>).
        Template(
            "chatml",
            CHATML,
            "You are a helpful assistant.",
            ("<|im_start|>user", "<|im_start|>assistant"),
            "<|im_end|>",
            system_role="<|im_start|>system",
        ),
        Template("plain", PLAIN),
    ]
}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def place_images(question: str, num_images: int) -> str:
    """Puts "<image>\\n" per image in front of a question that has no placeholder, as LLaVA does.

    A question that has placeholders keeps them where they are; their count must match.
    """
    if num_images < 0:
        raise PromptError(f"the number of images must be 0 or more, not {num_images}")
    found = question.count(IMAGE_PLACEHOLDER)
    if found == 0:
        return (IMAGE_PLACEHOLDER + "\n") * num_images + question
    if found != num_images:
        given = _plural(num_images, "image")
        raise PromptError(
            f"prompt has {_plural(found, IMAGE_PLACEHOLDER + ' placeholder')} but {given} "
            f"{'was' if num_images == 1 else 'were'} given"
        )
    return question


def render_prompt(template: str, question: str, num_images: int, chat_template: str | None = None) -> str:
    """The text to tokenize for one question, ending where the assistant's answer begins.

    `template` names one of TEMPLATES, or "chat" for the tokenizer's own jinja `chat_template`
    (rendered with one user message and add_generation_prompt; its {{ bos_token }} renders
    empty, because tokenize_prompt adds BOS by id). PromptError when the name is unknown, the
    placeholders do not match the images, or "chat" has no template.
    """
    message = place_images(question, num_images)
    return render_conversation(template, [Turn(USER, message)], None, chat_template)


def render_conversation(
    template: str, turns: list[Turn], system: str | None, chat_template: str | None
) -> str:
    """The text to tokenize for a conversation, ending where the next assistant answer begins.

    `turns` alternate user and assistant, first and last a user turn, each text with its
    `<image>` placeholders where its images stand. `system` replaces the template's system
    prompt (None keeps it); for "chat" it is a system message in front of the turns.
    `template` and `chat_template` as in render_prompt. PromptError when the turns do not
    alternate like that, the name is unknown, or "chat" has no template or fails.
    """
    if template == CHAT:
        if chat_template is None:
            raise PromptError(
                f"template {CHAT!r} needs the tokenizer's chat_template and this tokenizer has none; "
                f"use one of: {', '.join(TEMPLATES)}"
            )
        return _render_chat(chat_template, turns, system)
    if template not in TEMPLATES:
        raise PromptError(f"unknown prompt template {template!r}; known: {', '.join([*TEMPLATES, CHAT])}")
    return TEMPLATES[template].render_turns(turns, system)


def _render_chat(chat_template: str, turns: list[Turn], system: str | None) -> str:
    """Renders a Hugging Face chat template like transformers' apply_chat_template, with
    add_generation_prompt and empty special tokens.

    Tokenizer templates take string content; processor templates (llava-hf) iterate typed
    content parts and write "<image>" themselves. The string render is tried first; the render
    kept holds as many placeholders as the turns do, and every user turn's text (answers
    are not looked for: templates may rewrite them, e.g. drop their reasoning).
    """
    check_turns(turns)
    compiled = _compile_chat_template(chat_template)
    num_images = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    user_texts = [_without_placeholders(turn.text).strip() for turn in turns if turn.role == USER]
    found = 0
    for typed in (False, True):
        try:
            rendered = compiled.render(
                messages=_chat_messages(turns, system, typed),
                add_generation_prompt=True,
                bos_token="",
                eos_token="",
                unk_token="",
                pad_token="",
            )
        except Exception as err:  # a template's own raise_exception, or a type error inside it
            if typed:
                raise PromptError(f"the tokenizer's chat template failed: {err}") from None
            continue
        found = rendered.count(IMAGE_PLACEHOLDER)
        if found == num_images and all(text in rendered for text in user_texts):
            return rendered
    raise PromptError(
        f"the tokenizer's chat template rendered {_plural(found, IMAGE_PLACEHOLDER + ' placeholder')} "
        f"for {_plural(num_images, 'image')}; pick a named template instead: {', '.join(TEMPLATES)}"
    )


def _chat_messages(turns: list[Turn], system: str | None, typed: bool) -> list[dict]:
    """A chat template's `messages`: the system message first when there is one, then the turns.

    Content is each text as it is, or (`typed`) content parts: {"type": "image"} per
    placeholder, then {"type": "text"} with the placeholders taken out.
    """
    messages = [] if system is None else [("system", system)]
    messages += [(turn.role, turn.text) for turn in turns]
    return [{"role": role, "content": _content_parts(text) if typed else text} for role, text in messages]


def _content_parts(text: str) -> list[dict]:
    images = [{"type": "image"} for _ in range(text.count(IMAGE_PLACEHOLDER))]
    return [*images, {"type": "text", "text": _without_placeholders(text)}]


def _without_placeholders(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")


def _compile_chat_template(chat_template: str) -> jinja2.Template:
    """The template in a sandbox, with transformers' extras: raise_exception, loop controls and
    the {% generation %} tag. PromptError when jinja2 is missing or the template does not parse."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise PromptError(
            "template 'chat' needs jinja2 (pip install jinja2); or pick a named template: "
            + ", ".join(TEMPLATES)
        ) from None

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} (transformers' assistant-mask tag): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(text):
        raise jinja2.exceptions.TemplateError(text)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(chat_template)
    except jinja2.TemplateError as err:
        raise PromptError(f"the tokenizer's chat template does not parse: {err}") from None


def tokenize_prompt(tokenizer: tokenizers.Tokenizer, prompt: str, bos_id: int | None) -> list[list[int]]:
    """Token ids of the text chunks around each `<image>`: len(placeholders) + 1 chunks.

    Each chunk is encoded on its own without special tokens (so each gets the tokenizer's dummy
    "▁" prefix, as in the original per-chunk tokenization); `bos_id`, when not None, starts the
    first chunk only. Image i's embeddings go between chunk i and chunk i + 1. Chunks can be
    empty (an image at the very start or end, or two images in a row).
    """
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    ids = [tokenizer.encode(chunk, add_special_tokens=False).ids if chunk else [] for chunk in chunks]
    if bos_id is not None:
        ids[0] = [bos_id, *ids[0]]
    return ids


def count_prompt_tokens(chunks: list[list[int]], image_tokens: int | Sequence[int]) -> int:
    """Sequence length of a tokenized prompt once each image stands for its embeddings:
    `image_tokens` each (LLaVA-1.5), or image i for image_tokens[i] (LLaVA-1.6, by its size)."""
    images = len(chunks) - 1
    if isinstance(image_tokens, int):
        image_tokens = [image_tokens] * images
    if len(image_tokens) != images:
        raise PromptError(f"{images} images in the prompt, token counts given for {len(image_tokens)}")
    return sum(len(chunk) for chunk in chunks) + sum(image_tokens)
