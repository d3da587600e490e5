"""The named chat templates: LLaMA-Factory's template names, each a Template record (data only).

The facts (role formats, system format, default system prompt, stop words, thought words,
tool result format, tool format name) are those of LLaMA-Factory's template registry
(src/llamafactory/data/template.py), written here as data. How they map:
- LLaMA-Factory's user format ends with the assistant header; here the header is `generation`,
  so add_generation_prompt can render it alone. Its observation format is `tool` (same split).
- Its assistant format defaults to content + eos, or content alone for `efficient_eos` templates;
  tuneforge appends the tokenizer's eos to every learned reply that lacks it (data/encode.py).
- `replace_eos` templates end replies with their first stop word; the tokenizer's eos is kept.
- Its Llama2Template (system text inside the first user turn) is `system_in_user`.
- Its ReasoningTemplate is `thought`; GLM-4.7's empty thought is its closing word alone.
- Its format_function (a function-call turn) is `function` where it differs from the reply format, and
  a format_tools written as a plain string is `tools`; the tool formats are data/tool_formats.py.
- A multimodal model's template has its text formats (images, videos, audio are not supported)
  and a note.
"""

from __future__ import annotations

from .template_record import Template

_MM = "multimodal model: text formats only"
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_HELPFUL = "You are a helpful assistant."


def _t(name: str, user: str, generation: str, assistant: str = "{content}{eos}", system: str = "{content}",
       tool: str | None = None, **facts) -> Template:
    """One LLaMA-Factory template: the system format defaults to the bare content and the tool
    result format to the user format, as in its registry."""
    return Template(name, user=user, assistant=assistant, generation=generation, system=system,
                    tool=user if tool is None else tool, **facts)


def _like(family: dict, name: str, **facts) -> Template:
    return _t(name, **{**family, **facts})


_CHATML = dict(user="<|im_start|>user\n{content}<|im_end|>\n", generation="<|im_start|>assistant\n",
               assistant="{content}<|im_end|>\n", system="<|im_start|>system\n{content}<|im_end|>\n",
               tool="<|im_start|>tool\n{content}<|im_end|>\n", stop_words=("<|im_end|>",))
_CHATML_NO_TOOL = {**_CHATML, "tool": None}
_QWEN = {**_CHATML, "tool": "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n",
         "tool_format": "qwen"}
_QWEN35 = {**_QWEN, "tool_format": "qwen3_5"}
_THINK = ("<think>\n", "\n</think>\n\n")
_THINK_TIGHT = ("<think>", "</think>")
_LLAMA3 = dict(prefix="{bos}", user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
               generation="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant="{content}<|eot_id|>",
               system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
               tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
               stop_words=("<|eot_id|>", "<|eom_id|>"), tool_format="llama3")
_GEMMA = dict(prefix="{bos}", system_in_user=True, user="<start_of_turn>user\n{content}<end_of_turn>\n",
              generation="<start_of_turn>model\n", assistant="{content}<end_of_turn>\n", system="{content}\n\n",
              tool="<start_of_turn>tool\n{content}<end_of_turn>\n", stop_words=("<end_of_turn>",))
_GEMMA4 = dict(prefix="{bos}", user="<|turn>user\n{content}<turn|>\n", generation="<|turn>model\n",
               assistant="{content}<turn|>\n", system="<|turn>system\n<|think|>{content}<turn|>\n",
               tool="<|turn>tool\n{content}<turn|>\n", stop_words=("<turn|>",), default_system=_HELPFUL,
               thought=("<|channel>thought\n", "<channel|>"), tool_format="gemma4", function="<|tool>{content}<tool|>")
_GLM4 = dict(prefix="[gMASK]<sop>", user="<|user|>\n{content}", generation="<|assistant|>", assistant="\n{content}",
             system="<|system|>\n{content}", tool="<|observation|>\n{content}",
             stop_words=("<|user|>", "<|observation|>"), tool_format="glm4", function="{content}")
_MISTRAL = dict(prefix="{bos}", system_in_user=True, user="[INST] {content}[/INST]", generation="",
                assistant=" {content}{eos}", system="{content}\n\n",
                tool='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]', tool_format="mistral",
                function="[TOOL_CALLS] {content}{eos}")
_TEKKEN = dict(prefix="{bos}", system_in_user=True, user="[INST]{content}[/INST]", generation="",
               system="{content}\n\n", tool='[TOOL_RESULTS]{"content": {content}}[/TOOL_RESULTS]',
               tool_format="mistral", function="[TOOL_CALLS]{content}{eos}")
_VICUNA_LIKE = dict(user="USER: {content} ", generation="ASSISTANT:", default_system=_VICUNA_SYSTEM)
_DEEPSEEK3 = dict(prefix="{bos}", user="<｜User｜>{content}", generation="<｜Assistant｜>")
_KIMI = dict(user="<|im_user|>user<|im_middle|>{content}<|im_end|>",
             generation="<|im_assistant|>assistant<|im_middle|>", assistant="{content}<|im_end|>",
             system="<|im_system|>system<|im_middle|>{content}<|im_end|>", stop_words=("<|im_end|>",))
_LFM2 = {**_CHATML, "tool": "<|im_start|>tool\n<|tool_response_start|>{content}<|tool_response_end|><|im_end|>\n",
         "tool_format": "lfm2"}
_PHI = dict(user="<|user|>\n{content}<|end|>\n", generation="<|assistant|>\n", assistant="{content}<|end|>\n",
            system="<|system|>\n{content}<|end|>\n", stop_words=("<|end|>",))
_GRANITE = dict(user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n",
                generation="<|start_of_role|>assistant<|end_of_role|>", assistant="{content}<|end_of_text|>\n",
                system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n")
_SEED = dict(user="{bos}user\n{content}{eos}", generation="{bos}assistant\n", system="{bos}system\n{content}{eos}")
_HY = "<｜hy_place▁holder▁no▁"

# tuneforge's first ten come first: the Ollama Modelfile export picks the first template that
# renders as a tokenizer's chat template does (export/modelfile.py), so their order is kept.
_FIRST = [
    Template("empty", system="{content}", user="{content}", tool="{content}", generation="",
             assistant="{content}{eos}"),
    Template("default", system="System: {content}\n", user="Human: {content}\n", tool="Tool: {content}\n",
             generation="Assistant:", assistant=" {content}{eos}\n"),
    Template("alpaca", system="{content}\n\n", user="### Instruction:\n{content}\n\n",
             tool="### Observation:\n{content}\n\n", generation="### Response:\n", assistant="{content}{eos}\n\n",
             default_system="Below is an instruction that describes a task. "
             "Write a response that appropriately completes the request."),
    Template("vicuna", system="{content} ", user="USER: {content} ", tool="TOOL: {content} ",
             generation="ASSISTANT:", assistant=" {content}{eos}", default_system=_VICUNA_SYSTEM),
    # plain text for few-shot benchmarks (LLaMA-Factory's eval examples use it)
    Template("fewshot", system="{content}\n\n", user="{content}", tool="{content}", generation="",
             assistant="{content}\n\n"),
    _like(_CHATML, "chatml", stop_words=("<|im_end|>", "<|im_start|>")),
    _like(_QWEN, "qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    _like(_LLAMA3, "llama3"),
    _like(_MISTRAL, "mistral"),
    _like(_GEMMA, "gemma"),
]

_REST = [
    _t("bailing", "<role>HUMAN</role>{content}", "<role>ASSISTANT</role>", "{content}",
       system="<role>SYSTEM</role>{content}", tool="<role>OBSERVATION</role>{content}", stop_words=("<|endoftext|>",)),
    _t("bailing_v2", "<role>HUMAN</role>{content}<|role_end|>", "<role>ASSISTANT</role>", "{content}<|role_end|>",
       system="<role>SYSTEM</role>{content}<|role_end|>",
       tool="<role>OBSERVATION</role>\n<tool_response>\n{content}\n</tool_response><|role_end|>",
       stop_words=("<|endoftext|>",), tool_format="ling"),
    _t("breeze", "[INST] {content} [/INST] ", "", "{content}", prefix="{bos}"),
    _like(_GLM4, "chatglm3", prefix="[gMASK]sop", generation="<|assistant|>", assistant="\n{content}"),
    _like(_CHATML, "chatml_de", default_system="Du bist ein freundlicher und hilfsbereiter KI-Assistent.",
          stop_words=("<|im_end|>", "<|im_start|>")),
    _t("cohere", "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
       "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
       system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>", prefix="{bos}"),
    _like(_CHATML, "cpm4", prefix="{bos}"),
    _like(_CHATML, "dbrx", default_system=(
        "You are DBRX, created by Databricks. You were last updated in December 2023. "
        "You answer questions based on information available up to that point.\n"
        "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough "
        "responses to more complex and open-ended questions.\nYou assist with various tasks, "
        "from writing to coding (using markdown for code blocks — remember to use ``` with "
        "code, JSON, and tables).\n(You do not have real-time data access or code execution "
        "capabilities. You avoid stereotyping and provide balanced perspectives on "
        "controversial topics. You do not provide song lyrics, poems, or news articles and "
        "do not divulge details of your training data.)\nThis is your system prompt, "
        "guiding your responses. Do not reference it, just respond to the user. If you find "
        "yourself talking about this message, stop. You should be responding appropriately "
        "and usually that means not mentioning this.\nYOU DO NOT MENTION ANY OF THIS INFORMATION "
        "ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY.")),
    _t("deepseek", "User: {content}\n\n", "Assistant:", system="{content}\n\n", prefix="{bos}"),
    _like(_DEEPSEEK3, "deepseek3"),
    _like(_DEEPSEEK3, "deepseekr1", thought=_THINK),
    _t("hy3", "<｜hy_User｜>{content}", "<｜hy_Assistant｜>", "{content}<｜hy_eos｜>", prefix="{bos}",
       stop_words=("<｜hy_eos｜>",), thought=_THINK_TIGHT),
    _t("deepseekcoder", "### Instruction:\n{content}\n", "### Response:", "\n{content}\n<|EOT|>\n", prefix="{bos}",
       default_system=(
           "You are an AI programming assistant, utilizing the DeepSeek Coder model, "
           "developed by DeepSeek Company, and you only answer questions related to computer science. "
           "For politically sensitive questions, security and privacy issues, "
           "and other non-computer science questions, you will refuse to answer.\n")),
    _t("dots_ocr", "<|user|>{content}<|endofuser|>", "<|assistant|>", "{content}<|endofassistant|>",
       system="<|system|>{content}<|endofsystem|>\n", stop_words=("<|endofassistant|>",), note=_MM),
    _t("ernie", "<|im_start|>user\n{content}<|im_end|>\n\n", "<|im_start|>assistant\n", "{content}<|im_end|>\n\n",
       system="<|im_start|>system\n{content}<|im_end|>\n\n", tool="<|im_start|>tool\n{content}<|im_end|>\n\n",
       default_system="<global_setting>\nthink_mode=True\n</global_setting>", stop_words=("<|im_end|>",)),
    _t("ernie_nothink", "User: {content}\n", "Assistant: ", "{content}<|end_of_sentence|>", system="{content}\n",
       prefix="<|begin_of_sentence|>", stop_words=("<|end_of_sentence|>",)),
    _t("ernie_vl", "User: {content}", "\nAssistant: ", "{content}<|end_of_sentence|>", system="{content}\n",
       stop_words=("<|end_of_sentence|>",), thought=_THINK, note=_MM),
    _t("exaone", "[|user|]{content}\n", "[|assistant|]", "{content}{eos}\n", system="[|system|]{content}[|endofturn|]\n"),
    _t("falcon", "User: {content}\n", "Falcon:", "{content}\n"),
    _like(_CHATML, "falcon_h1", prefix="{bos}", stop_words=("<|im_end|>", "<|end_of_text|>")),
    _like(_GEMMA, "gemma2", stop_words=("<eos>", "<end_of_turn>")),
    _like(_GEMMA, "gemma3", note="multimodal model (Gemma 3 4B and up): text formats only"),
    _like(_GEMMA, "gemma3n", note=_MM),
    _like(_GEMMA4, "gemma4", note=_MM),
    _like(_GEMMA4, "gemma4n", note=_MM),
    _like(_GLM4, "glm4"),
    _like(_GLM4, "glm4_moe", thought=_THINK, tool_format="glm4_moe"),
    _like(_GLM4, "glm4v", thought=_THINK, stop_words=("<|user|>", "<|observation|>", "</answer>"), note=_MM),
    _like(_GLM4, "glm4_5v", thought=_THINK, stop_words=("<|user|>", "<|observation|>", "</answer>"),
          tool_format="glm4_moe", note=_MM),
    _like(_GLM4, "glm_ocr", note=_MM),
    _like(_GLM4, "glm4_7", thought=_THINK_TIGHT, empty_thought="</think>", tool_format="glm4_moe"),
    _like(_GLM4, "glmz1", thought=_THINK),
    _t("gpt_oss", "<|start|>user<|message|>{content}<|end|>", "<|start|>assistant", "{content}",
       system="<|start|>system<|message|>{content}<|end|>",
       default_system="You are ChatGPT, a large language model trained by OpenAI.",
       thought=("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>")),
    _like(_GRANITE, "granite3"),
    _t("granite3_vision", "<|user|>\n{content}\n", "<|assistant|>\n", system="<|system|>\n{content}\n",
       default_system=_VICUNA_SYSTEM, note=_MM),
    # LLaMA-Factory's observation ends with "<|start_of_role|>assistant\n"; the usual header is used here
    _like(_GRANITE, "granite4", tool="<|start_of_role|>tool<|end_of_role|>{content}<|end_of_text|>\n",
          stop_words=("<|end_of_text|>",), default_system="You are Granite, developed by IBM. You are a helpful AI assistant."),
    _t("index", "reserved_0{content}", "reserved_1", "{content}", system="<unk>{content}"),
    _t("hunyuan", "{content}<|extra_0|>", "", "{content}<|eos|>", system="{content}<|extra_4|>",
       prefix="<|startoftext|>", stop_words=("<|eos|>",)),
    _t("hunyuan_small", "<｜hy_User｜>{content}", _HY + "8｜>", "{content}" + _HY + "2｜>",
       system="{content}" + _HY + "3｜>", prefix="<｜hy_begin▁of▁sentence｜>", stop_words=(_HY + "2｜>",)),
    _t("hy_dense_1_8b", "<｜hy_User｜>{content}", "", "<｜hy_Assistant｜>{content}", system="{content}" + _HY + "3｜>",
       prefix="{bos}", stop_words=(_HY + "2｜>",)),
    _t("hy_dense_7b", "{content}<|extra_0|>", "", "{content}", system="{content}<|extra_4|>", prefix="{bos}",
       stop_words=("<|eos|>",)),
    _like(_CHATML_NO_TOOL, "intern2", prefix="{bos}", default_system=(
        "You are an AI assistant whose name is InternLM (书生·浦语).\n"
        "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
        "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
        "- InternLM (书生·浦语) can understand and communicate fluently in the language "
        "chosen by the user such as English and 中文.")),
    _like(_CHATML_NO_TOOL, "intern_vl", prefix="{bos}", note=_MM, default_system=(
        "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")),
    _like(_CHATML_NO_TOOL, "intern_s1", prefix="{bos}", note=_MM),
    _like(_QWEN, "keye_vl", thought=_THINK, note=_MM),
    _like(_KIMI, "kimi_vl", default_system="You are a helpful assistant", thought=("◁think▷", "◁/think▷"), note=_MM),
    _like(_LFM2, "lfm2", default_system="You are a helpful AI assistant."),
    _like(_LFM2, "lfm2_vl", default_system="You are a helpful multimodal assistant by Liquid AI.", note=_MM),
    _t("llama2", "{bos}[INST] {content} [/INST]", "", system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_user=True),
    _t("llama2_zh", "{bos}[INST] {content} [/INST]", "", system="<<SYS>>\n{content}\n<</SYS>>\n\n",
       system_in_user=True, default_system="You are a helpful assistant. 你是一个乐于助人的助手。"),
    _t("llama4", "<|header_start|>user<|header_end|>\n\n{content}<|eot|>", "<|header_start|>assistant<|header_end|>\n\n",
       "{content}<|eot|>", system="<|header_start|>system<|header_end|>\n\n{content}<|eot|>",
       tool="<|header_start|>ipython<|header_end|>\n\n{content}<|eot|>", prefix="{bos}",
       stop_words=("<|eot|>", "<|eom|>"), tool_format="llama3", note=_MM),
    _like(_LLAMA3, "mllama", note=_MM),
    _like(_KIMI, "moonlight", default_system="You are a helpful assistant provided by Moonshot-AI."),
    _like(_QWEN, "moss_vl", note=_MM),
    _like(_VICUNA_LIKE, "llava", note=_MM),
    _like(_VICUNA_LIKE, "llava_next", note=_MM),
    _like(_LLAMA3, "llava_next_llama3", note=_MM),
    _like(_MISTRAL, "llava_next_mistral", note=_MM),
    _like(_QWEN, "llava_next_qwen", default_system=_HELPFUL, note=_MM),
    _like(_CHATML_NO_TOOL, "llava_next_yi", note=_MM),
    _like(_VICUNA_LIKE, "llava_next_video", note=_MM),
    _like(_MISTRAL, "llava_next_video_mistral", note=_MM),
    _like(_CHATML_NO_TOOL, "llava_next_video_yi", note=_MM),
    _like(_QWEN, "mimo", default_system=_HELPFUL, thought=_THINK),
    _like(_QWEN, "mimo_v2", default_system="You are MiMo, a helpful AI assistant engineered by Xiaomi.",
          thought=_THINK_TIGHT),
    _like(_QWEN, "mimo_vl", default_system="You are MiMo, an AI assistant developed by Xiaomi.", thought=_THINK,
          note=_MM),
    _like(_CHATML_NO_TOOL, "minicpm_v", default_system=_HELPFUL, note=_MM),
    _like(_CHATML_NO_TOOL, "minicpm_v_4_6", default_system=_HELPFUL, note=_MM),
    _like(_CHATML_NO_TOOL, "minicpm_o", note=_MM,
          default_system="You are a helpful assistant. You can accept audio and text input and output voice and text."),
    _t("minimax1", "<beginning_of_sentence>user name=user\n{content}<end_of_sentence>\n",
       "<beginning_of_sentence>ai name=assistant\n", "{content}<end_of_sentence>\n",
       system="<beginning_of_sentence>system ai_setting=assistant\n{content}<end_of_sentence>\n",
       tool="<beginning_of_sentence>tool name=tools\n{content}<end_of_sentence>\n", default_system=_HELPFUL,
       stop_words=("<end_of_sentence>",), tool_format="minimax1"),
    _t("minimax2", "]~b]user\n{content}[e~[\n", "]~b]ai\n", "{content}[e~[\n", system="]~!b[]~b]system\n{content}[e~[\n",
       tool="]~b]tool\n<response>{content}</response>[e~[\n", stop_words=("[e~[",), thought=_THINK,
       default_system="You are a helpful assistant. Your name is MiniMax-M2.1 and is built by MiniMax.",
       tool_format="minimax2"),
    _like(_TEKKEN, "ministral"),
    # not Llama2Template: a system turn of its own
    _like(_TEKKEN, "mistral_small", system_in_user=False, system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]", note=_MM),
    _like(_TEKKEN, "ministral3", note=_MM),
    _t("olmo", "<|user|>\n{content}", "<|assistant|>\n", prefix="{eos}"),
    _t("openchat", "GPT4 Correct User: {content}{eos}", "GPT4 Correct Assistant:", prefix="{bos}"),
    _t("openchat-3.6", "<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{content}<|eot_id|>",
       "<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n", prefix="{bos}", stop_words=("<|eot_id|>",)),
    _like(_CHATML, "opencoder", default_system="You are OpenCoder, created by OpenCoder Team."),
    _t("paligemma", "{content}\n", "", prefix="{bos}", system_in_user=True, note=_MM),
    _like(_GEMMA, "paligemma_chat", system="{content}", note=_MM),
    _like(_PHI, "phi"),
    # LLaMA-Factory's prefix here is a set without bos/eos, which it renders as nothing
    _like(_PHI, "phi_small"),
    _t("phi4", "<|im_start|>user<|im_sep|>{content}<|im_end|>", "<|im_start|>assistant<|im_sep|>", "{content}<|im_end|>",
       system="<|im_start|>system<|im_sep|>{content}<|im_end|>", stop_words=("<|im_end|>",)),
    _t("phi4_mini", "<|user|>{content}<|end|>", "<|assistant|>", "{content}<|end|>", system="<|system|>{content}<|end|>",
       stop_words=("<|end|>",), tools="<|tool|>{content}<|/tool|>"),
    _like(_TEKKEN, "pixtral", note=_MM),
    _like(_QWEN, "qwen3", thought=_THINK),
    _like(_QWEN, "qwen3_nothink"),
    _like(_CHATML_NO_TOOL, "qwen2_audio", default_system=_HELPFUL, note=_MM),
    _like(_QWEN, "qwen2_omni", default_system=_HELPFUL, note=_MM),
    _like(_QWEN, "qwen3_omni", thought=_THINK, note=_MM),
    _like(_QWEN, "qwen3_omni_nothink", note=_MM),
    _like(_QWEN, "qwen2_vl", default_system=_HELPFUL, note="multimodal model (Qwen2-VL, Qwen2.5-VL): text formats only"),
    _like(_QWEN, "qwen3_vl", thought=_THINK, note=_MM),
    _like(_QWEN, "qwen3_vl_nothink", note=_MM),
    _like(_QWEN35, "qwen3_5", thought=_THINK, note=_MM),
    _like(_QWEN35, "qwen3_5_nothink", note=_MM),
    _like(_QWEN35, "qwen3_6", thought=_THINK, note=_MM),
    _t("sailor", "<|im_start|>question\n{content}<|im_end|>\n", "<|im_start|>answer\n", "{content}<|im_end|>\n",
       system="<|im_start|>system\n{content}<|im_end|>\n", stop_words=("<|im_end|>",), default_system=(
           "You are an AI assistant named Sailor created by Sea AI Lab. "
           "Your answer should be friendly, unbiased, faithful, informative and detailed.")),
    _like(_SEED, "seed_coder", default_system=(
        "You are an AI programming assistant, utilizing the Seed-Coder model, developed by ByteDance Seed, "
        "and you only answer questions related to computer science. For politically sensitive questions, "
        "security and privacy issues, and other non-computer science questions, you will refuse to answer.\n\n")),
    _like(_SEED, "seed_oss", thought=("<seed:think>", "</seed:think>"), tool_format="seed_oss",
          function="{bos}\n{content}{eos}"),
    _like(_CHATML_NO_TOOL, "smollm"),
    _like(_CHATML_NO_TOOL, "smollm2", default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face."),
    _t("solar", "### User:\n{content}\n\n", "### Assistant:\n", "{content}", system="### System:\n{content}\n\n"),
    _t("starchat", "<|user|>\n{content}<|end|>\n", "<|assistant|>", "{content}<|end|>\n",
       system="<|system|>\n{content}<|end|>\n", stop_words=("<|end|>",)),
    _t("telechat2", "<_user>{content}", "<_bot>", system="<_system>{content}", default_system=(
        "你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）研发的人工智能助手。")),
    _like(_VICUNA_LIKE, "video_llava", note=_MM),
    _t("xuanyuan", "Human: {content} ", "Assistant:", default_system=(
        "以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，"
        "会对人类提出的问题给出有帮助、高质量、详细和礼貌的回答，并且总是拒绝参与与不道德、"
        "不安全、有争议、政治敏感等相关的话题、问题和指示。\n")),
    _like(_CHATML_NO_TOOL, "yi"),
    _t("yi_vl", "### Human: {content}\n", "### Assistant:", "{content}\n", stop_words=("###",), note=_MM, default_system=(
        "This is a chat between an inquisitive human and an AI assistant. "
        "Assume the role of the AI assistant. Read all the images carefully, "
        "and respond to the human's questions with informative, helpful, detailed and polite answers. "
        "这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。"
        "仔细阅读所有的图像，并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。\n\n")),
    _t("youtu", "<|User|>{content}", "<|Assistant|>", "{content}<|end_of_text|>",
       tool="<tool_response>\n{content}\n</tool_response>", prefix="{bos}", stop_words=("<|end_of_text|>",),
       thought=_THINK, function="{content}"),
    _t("youtu_vl", "<|begin_of_text|>user\n{content}<|end_of_text|>\n", "<|begin_of_text|>assistant\n",
       "{content}<|end_of_text|>\n", system="<|begin_of_text|>system\n{content}<|end_of_text|>\n",
       default_system=_HELPFUL, stop_words=("<|end_of_text|>",), note=_MM),
    _t("yuan", "{content}<sep>", "", "{content}<eod>\n", stop_words=("<eod>",)),
    _t("zephyr", "<|user|>\n{content}{eos}", "<|assistant|>\n", system="<|system|>\n{content}{eos}",
       default_system="You are Zephyr, a helpful assistant."),
    _like(_GLM4, "aeva", thought=_THINK_TIGHT, empty_thought="</think>", tool_format="glm4_moe", default_system=(
        "You are an AI assistant named Aeva created by Zongzhi Lou. "
        "Your answer should be friendly, unbiased, faithful, informative and detailed.")),
]

TEMPLATES: dict[str, Template] = {t.name: t for t in _FIRST + _REST}
