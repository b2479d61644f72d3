"""runtime/prompts.py: templates as the original LLaVA repo writes them, and the <image> split."""

import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from runtime.errors import PromptError
from runtime.prompts import (
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    Turn,
    count_prompt_tokens,
    render_conversation,
    render_prompt,
    tokenize_prompt,
)

Q = "What is the colour of the ball?"

# One user turn with one image, as llava/conversation.py's get_prompt() writes it (the question
# gets "<image>\n" in front), ending where the answer begins.
EXPECTED = {
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: <image>\nWhat is the colour of the ball? ASSISTANT:",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "USER: <image>\nWhat is the colour of the ball? ASSISTANT:",
    "llava_llama_2": "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to "
    "understand the visual content that the user provides, and assist the user with a variety of tasks "
    "using natural language.\n<</SYS>>\n\n<image>\nWhat is the colour of the ball? [/INST]",
    "mistral_instruct": "[INST] <image>\nWhat is the colour of the ball? [/INST]",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
    "<image>\nWhat is the colour of the ball?<|im_end|><|im_start|>assistant\n",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<image>\nWhat is the colour of the ball?<|im_end|>\n<|im_start|>assistant\n",
    "plain": "<image>\nWhat is the colour of the ball?",
}

# llava-hf/llava-1.5-*-hf's chat template: typed content parts and transformers' {% generation %} tag.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A tokenizer (string content) template that writes BOS itself, Llama-2 style.
STRING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_templates_render_like_llava(name):
    assert render_prompt(name, Q, 1) == EXPECTED[name]


def test_every_template_is_tested():
    assert set(TEMPLATES) == set(EXPECTED)


def test_no_image():
    assert render_prompt("mistral_instruct", Q, 0) == f"[INST] {Q} [/INST]"
    assert render_prompt("plain", Q, 0) == Q


def test_images_are_prepended_per_image():
    assert render_prompt("mistral_instruct", Q, 2) == f"[INST] <image>\n<image>\n{Q} [/INST]"


def test_placeholders_stay_where_the_user_put_them():
    question = "Compare <image> with <image>: which is larger?"
    assert render_prompt("plain", question, 2) == question
    assert render_prompt("vicuna_v1", "<image>\n" + Q, 1) == EXPECTED["vicuna_v1"]


@pytest.mark.parametrize(
    "question, images, message",
    [
        ("<image> and <image>", 1, "prompt has 2 <image> placeholders but 1 image was given"),
        ("<image> only", 2, "prompt has 1 <image> placeholder but 2 images were given"),
        ("<image> only", 0, "prompt has 1 <image> placeholder but 0 images were given"),
    ],
)
def test_placeholder_count_mismatch(question, images, message):
    with pytest.raises(PromptError) as info:
        render_prompt("vicuna_v1", question, images)
    assert str(info.value) == message


def test_unknown_template_lists_known_ones():
    with pytest.raises(PromptError) as info:
        render_prompt("vicuna_v2", Q, 1)
    for name in [*TEMPLATES, "chat"]:
        assert name in str(info.value)


def test_chat_needs_a_template():
    with pytest.raises(PromptError, match="chat_template"):
        render_prompt("chat", Q, 1, chat_template=None)


def test_chat_processor_template():
    assert render_prompt("chat", Q, 1, LLAVA_HF_TEMPLATE) == f"USER: <image>\n{Q} ASSISTANT:"
    assert render_prompt("chat", Q, 0, LLAVA_HF_TEMPLATE) == f"USER: {Q} ASSISTANT:"


def test_chat_string_template_leaves_bos_to_tokenize_prompt():
    assert render_prompt("chat", Q, 1, STRING_TEMPLATE) == f"[INST] <image>\n{Q} [/INST]"


def test_chat_template_errors():
    with pytest.raises(PromptError, match="does not parse"):
        render_prompt("chat", Q, 1, "{% for %}")
    with pytest.raises(PromptError, match="failed: no images please"):
        render_prompt("chat", Q, 1, "{{ raise_exception('no images please') }}")
    with pytest.raises(PromptError, match="rendered 0 <image> placeholders for 1 image"):
        render_prompt("chat", Q, 1, "USER: hello ASSISTANT:")


# ---------------------------------------------------------------------------------------------
# Conversations: get_prompt() with several turns, as upstream writes them

TURNS = [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A ball."), Turn("user", "What colour?")]
SYSTEM = "Be brief."

# (template, system, prompt) for TURNS, written out from llava/conversation.py's get_prompt().
CONVERSATIONS = [
    (
        "vicuna_v1",
        None,
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nWhat is it? ASSISTANT: A ball.</s>USER: What colour? ASSISTANT:",
    ),
    (
        "vicuna_v1",
        SYSTEM,
        "Be brief. USER: <image>\nWhat is it? ASSISTANT: A ball.</s>USER: What colour? ASSISTANT:",
    ),
    (
        "llava_llama_2",
        None,
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to "
        "understand the visual content that the user provides, and assist the user with a variety of tasks "
        "using natural language.\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A ball. </s><s>[INST] What colour? [/INST]",
    ),
    (
        "llava_llama_2",
        SYSTEM,
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A ball. </s><s>[INST] What colour? [/INST]",
    ),
    ("llava_llama_2", "", "[INST] <image>\nWhat is it? [/INST] A ball. </s><s>[INST] What colour? [/INST]"),
    ("mistral_instruct", None, "[INST] <image>\nWhat is it? [/INST] A ball. </s>[INST] What colour? [/INST]"),
    (
        "chatml_direct",
        None,
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|>"
        "<|im_start|>assistant\nA ball.<|im_end|><|im_start|>user\nWhat colour?<|im_end|><|im_start|>assistant\n",
    ),
    (
        "chatml_direct",
        SYSTEM,
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|>"
        "<|im_start|>assistant\nA ball.<|im_end|><|im_start|>user\nWhat colour?<|im_end|><|im_start|>assistant\n",
    ),
    (
        "chatml",
        None,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA ball.<|im_end|>\n<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "chatml",
        SYSTEM,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA ball.<|im_end|>\n<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        "chatml",
        "",
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA ball.<|im_end|>\n<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\n",
    ),
    ("plain", None, "<image>\nWhat is it?\nA ball.\nWhat colour?"),
]


@pytest.mark.parametrize("name, system, prompt", CONVERSATIONS)
def test_conversations_render_like_llava(name, system, prompt):
    assert render_conversation(name, TURNS, system, None) == prompt
    assert TEMPLATES[name].render_turns(TURNS, system) == prompt


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_one_turn_renders_as_render(name):
    template = TEMPLATES[name]
    message = "<image>\n" + Q
    assert template.render(message) == template.render_turns([Turn("user", message)]) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_system_override_replaces_only_the_system_prompt(name):
    template = TEMPLATES[name]
    assert template.render_turns(TURNS, template.system) == template.render_turns(TURNS)


def test_chat_conversation_processor_template():
    expected = "USER: <image>\nWhat is it? ASSISTANT: A ball. USER: What colour? ASSISTANT:"
    assert render_conversation("chat", TURNS, None, LLAVA_HF_TEMPLATE) == expected
    assert render_conversation("chat", TURNS, SYSTEM, LLAVA_HF_TEMPLATE) == "Be brief. " + expected


def test_chat_conversation_string_template():
    expected = "[INST] <image>\nWhat is it? [/INST]A ball.[INST] What colour? [/INST]"
    assert render_conversation("chat", TURNS, None, STRING_TEMPLATE) == expected
    assert render_conversation("chat", TURNS, SYSTEM, STRING_TEMPLATE) == "Be brief." + expected


def test_chat_conversation_counts_placeholders_across_turns():
    last_message_only = "{{ messages[-1]['content'] }}"
    with pytest.raises(PromptError, match="rendered 0 <image> placeholders for 1 image"):
        render_conversation("chat", TURNS, None, last_message_only)


@pytest.mark.parametrize(
    "turns, message",
    [
        ([], "at least one user turn"),
        ([Turn("assistant", "Hi."), Turn("user", Q)], "starts with a 'user' turn, not 'assistant'"),
        ([Turn("user", Q), Turn("assistant", "Red.")], "ends with a 'user' turn"),
        ([Turn("user", Q), Turn("user", "Well?")], "turns 1 and 2 are both 'user'"),
        (TURNS + [Turn("assistant", "Red."), Turn("assistant", "Or?"), Turn("user", "Hm?")], "turns 4 and 5"),
        ([Turn("system", SYSTEM), Turn("user", Q)], "turn 1 has the unknown role 'system'"),
    ],
)
@pytest.mark.parametrize(
    "name, chat_template", [("vicuna_v1", None), ("plain", None), ("chat", STRING_TEMPLATE)]
)
def test_conversation_turns_must_alternate(turns, message, name, chat_template):
    with pytest.raises(PromptError, match=message):
        render_conversation(name, turns, None, chat_template)


def test_conversation_template_errors():
    with pytest.raises(PromptError, match="unknown prompt template 'vicuna_v2'"):
        render_conversation("vicuna_v2", TURNS, None, None)
    with pytest.raises(PromptError, match="chat_template"):
        render_conversation("chat", TURNS, None, None)


# ---------------------------------------------------------------------------------------------
# tokenize_prompt against the original algorithm

IMAGE_TOKEN_INDEX = -200  # llava/constants.py


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """llava/mm_utils.py's tokenizer_image_token, as upstream writes it (list output)."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def splice(chunks):
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX, *chunk]
    return ids


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    """(the runtime's tokenizers.Tokenizer, transformers' AutoTokenizer) on the tiny tokenizer."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from exporter.testing.tiny_tokenizer import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(folder)
    return Tokenizer.from_file(str(folder / "tokenizer.json")), AutoTokenizer.from_pretrained(folder)


PROMPTS = [
    Q,  # no image
    "<image>\n" + Q,  # image at the start
    "Look at <image> and tell me the colour.",  # in the middle
    Q + " <image>",  # at the end
    "<image>",  # nothing but an image
    "<image><image>\nCompare them.",  # two in a row
    "First <image> then <image>, which is red?",  # two apart
    " USER: <image>\n" + Q + " ASSISTANT:",  # a chunk that starts with a space
    render_prompt("vicuna_v1", Q, 1),
    render_prompt("llava_llama_2", Q, 2),
    render_prompt("mistral_instruct", "tab\there, ünïcødé 猫", 1),
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenize_prompt_equals_tokenizer_image_token(tokenizers_pair, prompt):
    tok, hf = tokenizers_pair
    chunks = tokenize_prompt(tok, prompt, hf.bos_token_id)
    assert len(chunks) == prompt.count(IMAGE_PLACEHOLDER) + 1
    assert chunks[0][:1] == [hf.bos_token_id]
    assert all(hf.bos_token_id not in chunk for chunk in chunks[1:])
    assert splice(chunks) == tokenizer_image_token(prompt, hf)


def test_tokenize_prompt_without_bos(tokenizers_pair):
    tok, hf = tokenizers_pair
    hf_no_bos = hf.__class__.from_pretrained(hf.name_or_path, add_bos_token=False)
    prompt = render_prompt("chatml", Q, 2)
    chunks = tokenize_prompt(tok, prompt, None)
    assert splice(chunks) == tokenizer_image_token(prompt, hf_no_bos)
    assert chunks[0][:1] != [hf.bos_token_id]


def test_tokenize_prompt_chunks_get_the_dummy_prefix(tokenizers_pair):
    tok, _ = tokenizers_pair
    chunks = tokenize_prompt(tok, "<image>\nHi", 1)
    assert chunks[0] == [1]
    assert tok.id_to_token(chunks[1][0]) == "▁"  # the "▁" before "\n" that LLaVA's ids have (29871 in Llama)


def test_count_prompt_tokens():
    assert count_prompt_tokens([[1, 2, 3]], 576) == 3
    assert count_prompt_tokens([[1, 2], [], [4]], 10) == 23


def test_prompts_module_stays_light():
    code = "import sys, runtime.prompts; sys.exit(bool({'torch', 'transformers'} & set(sys.modules)))"
    assert (
        subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
    )
