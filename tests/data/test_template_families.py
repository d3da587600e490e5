"""Named templates render as the model families' own chat templates do (offline: their public
chat_template text is a fixture, tests/data/family_chat_templates.py, rendered with jinja2 as
transformers renders it, with the family's bos / eos tokens)."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tests.data import family_chat_templates as fam
from tuneforge.data import get_template

CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green."},
]

QWEN = ("<|endoftext|>", "<|im_end|>")  # (bos given to the template, eos); Qwen has no bos token
LLAMA3 = ("<|begin_of_text|>", "<|eot_id|>")
GEMMA = ("<bos>", "<eos>")
DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
PHI = ("<s>", "<|endoftext|>")
MISTRAL = ("<s>", "</s>")

# (named template, the family's chat template, bos, eos, whether the whole conversation ending in a
# reply renders alike too, besides each prompt with the generation prompt)
FAMILIES = {
    "qwen2.5": ("qwen", fam.QWEN25, *QWEN, True),
    "qwen2-vl-text": ("qwen2_vl", fam.QWEN25.replace("You are Qwen, created by Alibaba Cloud. ", ""), *QWEN, True),
    "llama3": ("llama3", fam.LLAMA3, *LLAMA3, True),
    "gemma3": ("gemma3", fam.GEMMA3, *GEMMA, True),
    "gemma": ("gemma", fam.GEMMA3, *GEMMA, True),
    "phi4": ("phi4", fam.PHI4, "<|endoftext|>", "<|im_end|>", True),
    # Phi-3's template puts eos after a conversation that ends with a reply
    "phi3": ("phi", fam.PHI3, *PHI, False),
    "deepseek3": ("deepseek3", fam.DEEPSEEK_V3, *DEEPSEEK, True),
    "glm4": ("glm4", fam.GLM4, "<sop>", "<|endoftext|>", True),
    "yi": ("yi", fam.CHATML, "<|startoftext|>", "<|im_end|>", True),
    "chatml": ("chatml", fam.CHATML, "<s>", "<|im_end|>", True),
    "internlm2": ("intern2", fam.INTERNLM2, "<s>", "</s>", True),
    "mistral-small-2501": ("mistral_small", fam.MISTRAL_SMALL_2501, *MISTRAL, True),
}


def jinja(text: str, messages: list[dict], bos: str, eos: str, generation: bool, **kwargs) -> str:
    rendered, _ = render_jinja_template([messages], chat_template=text, add_generation_prompt=generation,
                                        bos_token=bos, eos_token=eos, **kwargs)
    return rendered[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_named_template_renders_as_the_familys_chat_template(family):
    name, own, bos, eos, whole = FAMILIES[family]
    ours = get_template(name).chat_template
    for end in (2, 4):  # system + turns, each prompt with the generation prompt
        assert jinja(ours, CHAT[:end], bos, eos, True) == jinja(own, CHAT[:end], bos, eos, True), family
    if whole:  # system + 2 user/assistant turns
        assert jinja(ours, CHAT, bos, eos, False) == jinja(own, CHAT, bos, eos, False), family
    else:
        assert jinja(ours, CHAT, bos, eos, False) + eos == jinja(own, CHAT, bos, eos, False)


def test_a_default_system_prompt_renders_as_the_familys():
    for name, own, bos, eos in [("qwen", fam.QWEN25, *QWEN)]:
        assert jinja(get_template(name).chat_template, CHAT[1:4], bos, eos, True) == jinja(own, CHAT[1:4], bos, eos, True)


def test_smollm2_renders_as_its_own_tokenizer(smol):
    """The default model's own tokenizer (on disk): LLaMA-Factory's smollm2 template, with a system
    message. Without one, LLaMA-Factory's default system prompt ends with a period SmolLM2's lacks."""
    own = smol.chat_template
    ours = get_template("smollm2").chat_template
    bos, eos = smol.bos_token, smol.eos_token
    for messages, generation in [(CHAT[:2], True), (CHAT[:4], True), (CHAT, False)]:
        assert jinja(ours, messages, bos, eos, generation) == jinja(own, messages, bos, eos, generation)
    assert jinja(ours, CHAT[1:2], bos, eos, True) != jinja(own, CHAT[1:2], bos, eos, True)


def test_qwen3_with_thinking_off_renders_a_single_turn_as_qwen3():
    """Qwen3's template with enable_thinking=false: an empty think block closes the generation prompt
    and opens the last reply. (In history, Qwen3 drops the block; LLaMA-Factory's qwen3 keeps an empty
    one in every reply, as here.)"""
    qwen3 = get_template("qwen3")
    for thinking_default in (True, False):  # the baked default, or the kwarg transformers passes on
        ours = qwen3.jinja(thinking_default)
        for messages, generation in [(CHAT[:2], True), (CHAT[:3], False)]:
            assert jinja(ours, messages, *QWEN, generation, enable_thinking=False) == jinja(
                fam.QWEN3, messages, *QWEN, generation, enable_thinking=False)
    assert jinja(qwen3.jinja(False), CHAT[:2], *QWEN, True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
