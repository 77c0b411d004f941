"""`--speculative-config`: vLLM's keys, parsed and checked once (no JAX here).

    {"method": "draft_model", "model": DIR, "num_speculative_tokens": K}
    {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    {"method": "layer_skip", "num_speculative_tokens": K, "num_layers": N}
    {"method": "package.module:factory", "num_speculative_tokens": K, ...}   (a plug-in)

plus `"adaptive": true|false` (choose k per step among the tiers, `tiers`) and, for the
verifier, `"acceptance": "rejection"` (lossless, the default), `"coupled"` (lossless, and a
seeded row's tokens equal plain decoding's) or `"typical"` (Medusa's typical acceptance: lossy,
opt-in; `typical_threshold`, `typical_alpha`). Anything else is a
`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxinfer.errors import ConfigError

BUILTIN_METHODS = ("draft_model", "ngram", "layer_skip", "synthetic")
ACCEPTANCE = ("rejection", "coupled", "typical")
MAX_SPECULATIVE_TOKENS = 7  # the verify step feeds 1 + k <= 8 query tokens per row
DEFAULT_TIERS = (0, 1, 3, 7)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """A parsed `--speculative-config`. `extra` keeps a plug-in's own keys."""

    method: str
    num_speculative_tokens: int
    model: str | None = None  # draft_model: the draft's directory (or preset / bundled name)
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    num_layers: int | None = None  # layer_skip: the target's first N layers draft
    adaptive: bool = False
    tiers: tuple[int, ...] = DEFAULT_TIERS
    acceptance: str = "rejection"
    typical_threshold: float = 0.09  # Medusa's epsilon
    typical_alpha: float = 0.3  # Medusa's delta = sqrt(epsilon) by default in its code; ours
    acceptance_rate: float | None = None  # synthetic (bench only): per-position acceptance
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def k(self) -> int:
        return self.num_speculative_tokens

    @property
    def is_plugin(self) -> bool:
        return ":" in self.method

    def active_tiers(self) -> tuple[int, ...]:
        """The k values compiled: every tier up to k (and k itself) when adaptive, else k."""
        if not self.adaptive:
            return (self.k,)
        return tuple(sorted({t for t in self.tiers if t <= self.k} | {self.k}))

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra"}
        out["tiers"] = list(self.tiers)
        out.update(dict(self.extra))
        return {k: v for k, v in out.items() if v is not None}


_KNOWN = {f.name for f in dataclasses.fields(SpeculativeConfig)} - {"extra"}


def parse_speculative_config(text: str | dict | None) -> SpeculativeConfig | None:
    """A `--speculative-config` value (JSON text or a dict; None/"" = off) -> config."""
    if text is None or text == "":
        return None
    if isinstance(text, str):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--speculative-config is not valid JSON: {e.msg} at char {e.pos}")
    else:
        raw = dict(text)
    if not isinstance(raw, dict):
        raise ConfigError("--speculative-config must be a JSON object")
    method = raw.get("method")
    if not isinstance(method, str) or not method:
        raise ConfigError('--speculative-config needs "method" (draft_model, ngram, '
                          'layer_skip or package.module:factory)')
    plugin = ":" in method
    if not plugin and method not in BUILTIN_METHODS:
        raise ConfigError(f"--speculative-config: unknown method {method!r} (known: "
                          f"{', '.join(BUILTIN_METHODS)}, or package.module:factory)")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown and not plugin:
        raise ConfigError(f"--speculative-config: unknown key(s) {', '.join(unknown)} for "
                          f"method {method!r}")
    k = raw.get("num_speculative_tokens")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError('--speculative-config needs "num_speculative_tokens" (an int)')
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise ConfigError(f"--speculative-config: num_speculative_tokens must be in "
                          f"[1, {MAX_SPECULATIVE_TOKENS}] (verify feeds 1 + k <= 8 tokens), "
                          f"got {k}")
    kw = {key: raw[key] for key in _KNOWN & set(raw)}
    if "tiers" in kw:
        tiers = kw["tiers"]
        if (not isinstance(tiers, list) or not tiers
                or any(isinstance(t, bool) or not isinstance(t, int) for t in tiers)
                or sorted(set(tiers)) != tiers or tiers[0] < 0):
            raise ConfigError("--speculative-config: tiers must be a strictly increasing list "
                              "of ints >= 0")
        kw["tiers"] = tuple(tiers)
    cfg = SpeculativeConfig(**kw, extra=tuple(sorted((key, raw[key]) for key in unknown)))
    _check(cfg)
    return cfg


def _check(cfg: SpeculativeConfig) -> None:
    if cfg.method == "draft_model":
        if not cfg.model or not isinstance(cfg.model, str):
            raise ConfigError('--speculative-config: method "draft_model" needs "model" (the '
                              "draft's directory)")
        # Whether it exists is checked where it loads (draft_model.make): the model names
        # live in jaxinfer.config, which imports this module.
    elif cfg.model is not None and not cfg.is_plugin:
        raise ConfigError(f'--speculative-config: "model" is for method draft_model, not '
                          f"{cfg.method!r}")
    if cfg.method == "ngram":
        lo, hi = cfg.prompt_lookup_min, cfg.prompt_lookup_max
        if isinstance(lo, bool) or isinstance(hi, bool) or not (
                isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 16):
            raise ConfigError("--speculative-config: need 1 <= prompt_lookup_min <= "
                              f"prompt_lookup_max <= 16, got {lo} and {hi}")
    if cfg.method == "layer_skip":
        n = cfg.num_layers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError('--speculative-config: method "layer_skip" needs "num_layers" '
                              "(a positive int: the target layers that draft)")
    if cfg.method == "synthetic":
        a = cfg.acceptance_rate
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a <= 1:
            raise ConfigError('--speculative-config: method "synthetic" (bench only) needs '
                              '"acceptance_rate" in [0, 1]')
    if cfg.acceptance not in ACCEPTANCE:
        raise ConfigError(f"--speculative-config: acceptance must be one of "
                          f"{', '.join(ACCEPTANCE)}, got {cfg.acceptance!r}")
    if not isinstance(cfg.adaptive, bool):
        raise ConfigError("--speculative-config: adaptive must be true or false")
    if not (0 < cfg.typical_threshold < 1 and 0 < cfg.typical_alpha < 1):
        raise ConfigError("--speculative-config: typical_threshold and typical_alpha must be "
                          "in (0, 1)")
