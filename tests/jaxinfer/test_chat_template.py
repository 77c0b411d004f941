"""Chat templates (jaxinfer/chat_template.py): rendering equals transformers'
`apply_chat_template` on several real-world template styles, where a template is found, and
`python -m jaxinfer.generate --chat`."""

from __future__ import annotations

import json

import pytest

from jaxinfer.chat_template import ChatTemplate, chat_template_for_model, load_chat_template
from jaxinfer.errors import ConfigError, RequestError

# Llama 3 / 3.1 style: BOS spelled out, header ids, eot after each message.
LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Llama 2 style: a system message folded into the first user turn, alternation enforced.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
# ChatML (Qwen2) style, with a default system prompt and a multi-line block (trim_blocks and
# lstrip_blocks matter here).
CHATML = """{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {% endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{% endif %}"""
# tojson (no HTML escaping), namespace and loop controls.
JSONY = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}"
         "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}\n{% endfor %}"
         "{{ ns.n }}{{ eos_token }}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello <b>there</b> & hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
]


def _hf_tokenizer(template: str):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", [LLAMA3, LLAMA2, CHATML, JSONY],
                         ids=["llama3", "llama2", "chatml", "tojson"])
@pytest.mark.parametrize("gen", [True, False])
def test_render_equals_transformers(template, gen):
    hf = _hf_tokenizer(template)
    ours = ChatTemplate(template, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    for conv in CONVERSATIONS:
        if template is JSONY:
            conv = [*conv, {"role": "skip", "content": "x"}]
        want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert ours.render(conv, add_generation_prompt=gen) == want


def test_raise_exception_and_bad_templates_are_clear():
    ours = ChatTemplate(LLAMA2, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(RequestError, match="roles must alternate"):
        ours.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(RequestError, match="messages is empty"):
        ours.render([])
    with pytest.raises(ConfigError, match="chat template t.jinja: line 1"):
        ChatTemplate("{% for x in %}", "t.jinja")
    # the sandbox: no access to Python internals
    with pytest.raises(RequestError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "u", "content": ""}])


def test_where_templates_come_from(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|begin|>"}, "eos_token": "<|end|>",
         "chat_template": "{{ bos_token }}cfg{{ eos_token }}"}))
    assert load_chat_template(tmp_path).render([{"role": "user", "content": ""}]) == \
        "<|begin|>cfg<|end|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "t"},
                           {"name": "default", "template": "d"}]}))
    assert load_chat_template(tmp_path).source == "d"
    (tmp_path / "chat_template.jinja").write_text("file")
    assert load_chat_template(tmp_path).source == "file"  # the file wins over the config
    override = tmp_path / "mine.jinja"
    override.write_text("mine")
    assert load_chat_template(tmp_path, override).source == "mine"
    with pytest.raises(ConfigError, match="--chat-template .*missing.jinja"):
        load_chat_template(tmp_path, tmp_path / "missing.jinja")
    assert chat_template_for_model("demo") is None  # the bundled demo model has none
    assert chat_template_for_model("dummy") is None


def test_generate_chat(tmp_path, capsys):
    from jaxinfer import generate
    from jaxinfer.tokenizer import tokenizer_for_model

    assert generate.main(["--model", "demo", "--chat", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxinfer.generate: error: --chat: the model "
                                               "has no chat template")
    path = tmp_path / "llama3.jinja"
    path.write_text(LLAMA3)
    messages = [{"role": "system", "content": "def"}, {"role": "user", "content": "import"}]
    assert generate.main(["--model", "demo", "--chat-template", str(path), "--messages",
                          json.dumps(messages), "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = tokenizer_for_model("demo")
    text = ChatTemplate(LLAMA3, special_tokens={"bos_token": "<s>"}).render(messages)
    assert out["prompt_ids"] == tok.encode(text, add_bos=False)
    assert out["prompt_ids"].count(tok.bos_id) == 1  # the template's BOS, not a second one
    assert len(out["token_ids"]) == 2
