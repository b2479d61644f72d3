"""Prompt templates and the `<image>` split, as the original LLaVA repo builds them.

A question becomes text by a named template (`render_prompt`), then token chunks with the
images between them (`tokenize_prompt`): the prompt is split on the literal `<image>`, each text
chunk is tokenized on its own without special tokens, and BOS goes only at the very start. That
is the id sequence of the original `tokenizer_image_token`, which tokenizes every chunk with BOS
and strips it from all but the first. No image token id has to exist in the vocabulary.

Templates follow haotian-liu/LLaVA `llava/conversation.py` (`Conversation.get_prompt` with one
user turn and an open assistant turn); `chatml` is LLaVA-NeXT's `conv_qwen`. Runtime module:
`tokenizers` and (for tokenizer chat templates only) jinja2, never torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.errors import PromptError

if TYPE_CHECKING:
    import tokenizers

IMAGE_PLACEHOLDER = "<image>"
CHAT = "chat"  # the tokenizer's own chat_template (jinja)

# Separator styles of llava/conversation.py (SeparatorStyle), plus LLaVA-NeXT's CHATML.
TWO = "two"  # vicuna: system SEP role: msg SEP role:
LLAMA_2 = "llama_2"  # [INST] <<SYS>>...<</SYS>> msg [/INST]
MPT = "mpt"  # system SEP role msg SEP role  (roles carry their own markup)
CHATML = "chatml"  # system SEP\n role\n msg SEP\n role\n
PLAIN = "plain"  # the question as it is


@dataclass(frozen=True)
class Template:
    """One conversation format: `render(message)` is the prompt up to where the answer begins."""

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = ""
    sep2: str | None = None

    def render(self, message: str) -> str:
        user, assistant = self.roles
        if self.style == TWO:
            # get_prompt: system + sep, then "role: message" + sep for the user, "role:" for the open turn
            return f"{self.system}{self.sep}{user}: {message}{self.sep}{assistant}:"
        if self.style == LLAMA_2:
            # wrap_sys only when there is a system message (upstream's later `if len(msg) > 0`)
            system = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if self.system else ""
            # upstream prepends sep, then lstrip(sep): a character set, and "[" is never in it
            return (self.sep + f"[INST] {system}{message} [/INST]").lstrip(self.sep)
        if self.style == MPT:
            return f"{self.system}{self.sep}{user}{message}{self.sep}{assistant}"
        if self.style == CHATML:
            head = "" if self.system == "" else f"{self.system}{self.sep}\n"
            return f"{head}{user}\n{message}{self.sep}\n{assistant}\n"
        if self.style == PLAIN:
            return message
        raise PromptError(f"template {self.name!r} has an unknown style {self.style!r}")


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
            "<|im_start|>system\nAnswer the questions.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "<|im_end|>",
        ),
        # LLaVA-NeXT's conv_qwen: Qwen's own ChatML (newline after every <|im_end|>).
        Template(
            "chatml",
            CHATML,
            "<|im_start|>system\nYou are a helpful assistant.",
            ("<|im_start|>user", "<|im_start|>assistant"),
            "<|im_end|>",
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
    if template == CHAT:
        if chat_template is None:
            raise PromptError(
                f"template {CHAT!r} needs the tokenizer's chat_template and this tokenizer has none; "
                f"use one of: {', '.join(TEMPLATES)}"
            )
        return _render_chat(chat_template, message, num_images)
    if template not in TEMPLATES:
        raise PromptError(f"unknown prompt template {template!r}; known: {', '.join([*TEMPLATES, CHAT])}")
    return TEMPLATES[template].render(message)


def _render_chat(chat_template: str, message: str, num_images: int) -> str:
    """Renders a Hugging Face chat template like transformers' apply_chat_template, for one user turn."""
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
        compiled = env.from_string(chat_template)
    except jinja2.TemplateError as err:
        raise PromptError(f"the tokenizer's chat template does not parse: {err}") from None
    # Tokenizer templates take a string; processor templates (llava-hf) iterate typed content
    # parts and write "<image>" themselves. Try the string first, keep the render that holds the
    # question and one placeholder per image.
    text = message.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
    parts = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    found = 0
    for content in (message, parts):
        try:
            rendered = compiled.render(
                messages=[{"role": "user", "content": content}],
                add_generation_prompt=True,
                bos_token="",
                eos_token="",
                unk_token="",
                pad_token="",
            )
        except Exception as err:  # a template's own raise_exception, or a type error inside it
            if content is parts:
                raise PromptError(f"the tokenizer's chat template failed: {err}") from None
            continue
        found = rendered.count(IMAGE_PLACEHOLDER)
        if found == num_images and text.strip() in rendered:
            return rendered
    raise PromptError(
        f"the tokenizer's chat template rendered {_plural(found, IMAGE_PLACEHOLDER + ' placeholder')} "
        f"for {_plural(num_images, 'image')}; pick a named template instead: {', '.join(TEMPLATES)}"
    )


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


def count_prompt_tokens(chunks: list[list[int]], num_image_tokens: int) -> int:
    """Sequence length of a tokenized prompt once each image stands for num_image_tokens embeddings."""
    return sum(len(chunk) for chunk in chunks) + (len(chunks) - 1) * num_image_tokens
