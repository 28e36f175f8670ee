"""Chat templates a merge can write into its output's tokenizer: three built-in formats
(Jinja, as transformers' `apply_chat_template` renders them) and the reading of a model
folder's own template."""
from __future__ import annotations

import json
from pathlib import Path

from cfmlang.io.gguf_header import gguf_header

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

BUILT_IN = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA}


def of_folder(folder: Path) -> str | None:
    """A tokenizer folder's chat template: chat_template.jinja, else the default one in
    tokenizer_config.json (a string, or a list of named templates); None when absent."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def of_gguf(path: Path) -> str | None:
    """The chat template in a GGUF file's metadata (`tokenizer.chat_template`)."""
    try:
        return gguf_header(path).string("tokenizer.chat_template", errors="replace") or None
    except Exception:   # gguf raises plain ValueError/KeyError on bad files
        return None
