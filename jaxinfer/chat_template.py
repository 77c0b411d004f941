"""Chat templates: a conversation (a list of messages) to the prompt text an instruct model
was trained on, rendered the way Hugging Face transformers' `apply_chat_template` does.

The template comes from, in order: a file the user names (`--chat-template FILE`), the model
folder's `chat_template.jinja`, or `tokenizer_config.json`'s `chat_template` (a string, or a list
of named templates of which "default" is used). Templates from the Hub are untrusted code, so
they render in jinja2's `ImmutableSandboxedEnvironment` with transformers' settings
(`trim_blocks`, `lstrip_blocks`, loop controls) and helpers (`raise_exception`, a `tojson` that
does not escape HTML, `strftime_now`). The template sees `messages`, `add_generation_prompt`,
`bos_token`, `eos_token` (and the other special tokens tokenizer_config.json names), as in
transformers.

The rendered text usually starts with the BOS token spelled out, so callers tokenize it with
`add_bos=False` (as vLLM and `apply_chat_template(tokenize=True)` do): a second BOS would
change what the model sees.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jaxinfer.errors import ConfigError, RequestError

TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                   "mask_token")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special-token strings it may refer to.

    Attributes:
        source: the template text.
        origin: where it came from (a path, for messages).
        special_tokens: {"bos_token": "<s>", ...} as tokenizer_config.json names them.
    """

    source: str
    origin: str = "<string>"
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        import jinja2

        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"chat template {self.origin}: line {e.lineno}: "
                              f"{e.message}") from None
        object.__setattr__(self, "_compiled", compiled)

    def render(self, messages: Sequence[Mapping[str, Any]], *,
               add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text of `messages` (each a dict with at least "role" and "content").

        Raises RequestError when the template rejects the conversation (its
        `raise_exception`, e.g. roles that do not alternate) or fails on it.
        """
        import jinja2

        if not messages:
            raise RequestError("messages is empty")
        context = {**self.special_tokens, **extra}
        try:
            return self._compiled.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **context)
        except jinja2.TemplateError as e:  # raise_exception(...) lands here too
            raise RequestError(f"messages: the chat template refused them: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise RequestError(f"messages: the chat template failed on them: "
                               f"{type(e).__name__}: {e}") from None


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters (<, >, &), which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def special_tokens(folder: Path | None) -> dict[str, str]:
    """The special-token strings of a model folder (tokenizer_config.json, then
    special_tokens_map.json), as transformers hands them to the template."""
    out: dict[str, str] = {}
    if folder is None:
        return out
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        data = _read_json(folder / name)
        for key in _SPECIAL_TOKENS:
            token = _token_string(data.get(key))
            if token is not None:
                out[key] = token
    return out


def _template_in_config(config: dict, path: Path) -> str | None:
    value = config.get("chat_template")
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ConfigError(f"{path}: chat_template lists no 'default' template "
                          f"(has {sorted(k for k in named if k)})")
    return None


def load_chat_template(folder: Path | None, override: str | Path | None = None
                       ) -> ChatTemplate | None:
    """The chat template for a model folder (None: the model has none; `folder` None: a
    random preset). `override` is a template file that wins over the model's own.

    Raises ConfigError for an unreadable or invalid template."""
    tokens = special_tokens(folder)
    if override is not None:
        path = Path(override)
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--chat-template {path}: {e.strerror or e}") from None
        return ChatTemplate(source, str(path), tokens)
    if folder is None:
        return None
    path = folder / TEMPLATE_FILE
    if path.is_file():
        try:
            return ChatTemplate(path.read_text(encoding="utf-8"), str(path), tokens)
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror or e}") from None
    config_path = folder / "tokenizer_config.json"
    source = _template_in_config(_read_json(config_path), config_path)
    return None if source is None else ChatTemplate(source, str(config_path), tokens)


def chat_template_for_model(model: str, override: str | Path | None = None
                            ) -> ChatTemplate | None:
    """The chat template for a `--model` value (as `tokenizer_for_model` finds its tokenizer)."""
    from jaxinfer.config import ModelConfig, model_source

    folder = model_source(model)
    return load_chat_template(None if isinstance(folder, ModelConfig) else folder, override)


NO_TEMPLATE = ("the model has no chat template (no chat_template.jinja, no chat_template in "
               "tokenizer_config.json); give one with --chat-template FILE")
