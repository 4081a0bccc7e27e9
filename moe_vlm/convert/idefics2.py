"""transformers' `Idefics2Connector` -> our perceiver projector (`projector="perceiver"`).

Import only: a LLaVA checkpoint has no place for a perceiver, so `export_vlm` refuses
it. The key table is a list of `keymap.Rule`s like every other component's, so shapes,
transposes ([out, in] -> [in, out]) and strictness are handled the same way.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from moe_vlm.convert import keymap
from moe_vlm.convert.hf import ConversionError, to_numpy
from moe_vlm.models.config import ConfigError, PerceiverConfig


def connector_rules(depth: int, ours: str = "projector.", hf: str = "") -> list[keymap.Rule]:
  """Our `PerceiverConnector` paths (under `ours`) <-> `Idefics2Connector` keys (under
  `hf`: "" for the connector's own state dict, "model.connector." inside
  Idefics2ForConditionalGeneration)."""
  mp, pr = f"{hf}modality_projection", f"{hf}perceiver_resampler"
  rules = [keymap.linear(f"{ours}modality_projection.{mine}", f"{mp}.{theirs}", False)
           for mine, theirs in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"),
                                ("wo", "down_proj"))]
  rules = [r for rs in rules for r in rs]
  rules.append(keymap.copy(f"{ours}latents", f"{pr}.latents"))
  for i in range(depth):
    o, h = f"{ours}layers.{i}", f"{pr}.layers.{i}"
    rules += keymap.norm(f"{o}.latents_norm", f"{h}.input_latents_norm", False)
    rules += keymap.norm(f"{o}.context_norm", f"{h}.input_context_norm", False)
    for mine, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                         ("out", "o_proj")):
      rules += keymap.linear(f"{o}.attn.{mine}", f"{h}.self_attn.{theirs}", False)
    rules += keymap.norm(f"{o}.post_attn_norm", f"{h}.post_attention_layernorm", False)
    for mine, theirs in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj")):
      rules += keymap.linear(f"{o}.mlp.{mine}", f"{h}.mlp.{theirs}", False)
  rules += keymap.norm(f"{ours}final_norm", f"{pr}.norm", False)
  return rules


def connector_params(state: Mapping[str, Any], depth: int, *, hf_prefix: str = "",
                     ours: str = "projector.",
                     expected: Optional[Mapping[str, Any]] = None) -> dict[str, np.ndarray]:
  """Flat params {our path: numpy array} from an Idefics2Connector state dict.

  state: torch tensors or arrays; keys outside `hf_prefix` are ignored (a whole
    IDEFICS2 checkpoint may be passed), keys inside it must all be used.
  expected: our shapes by path (e.g. `ParamCodec(...).shapes`): when given, every
    converted tensor is checked against it and every expected `ours` path must be filled.
  """
  rules = connector_rules(depth, ours, hf_prefix)
  used = keymap.hf_keys(rules)
  missing = sorted(used - set(state))
  if missing:
    raise ConversionError(f"state dict lacks {len(missing)} Idefics2Connector tensors, e.g. "
                          f"{missing[:5]} (hf_prefix={hf_prefix!r}, depth={depth})")
  extra = sorted(k for k in state if k.startswith(hf_prefix) and k not in used)
  if extra:
    raise ConversionError(f"state dict has {len(extra)} connector tensors the model does not "
                          f"use, e.g. {extra[:5]} (is depth={depth} right?)")
  out: dict[str, np.ndarray] = {}
  for rule in rules:
    out.update(zip(rule.ours, rule.to_ours([to_numpy(state[k]) for k in rule.hf])))
  if expected is not None:
    for path, value in out.items():
      want = expected.get(path)
      if want is None:
        raise ConversionError(f"{path!r} is not a parameter of the model")
      if tuple(value.shape) != tuple(want.shape):
        raise ConversionError(f"{path}: converted shape {tuple(value.shape)}, model expects "
                              f"{tuple(want.shape)}")
    unfilled = sorted(p for p in expected if p.startswith(ours) and p not in out)
    if unfilled:
      raise ConversionError(f"{len(unfilled)} model parameters have no source tensor, e.g. "
                            f"{unfilled[:5]}")
  return out


def perceiver_config_from_hf(hf: Any) -> PerceiverConfig:
  """PerceiverConfig from a transformers `Idefics2Config`."""
  p, t = hf.perceiver_config, hf.text_config
  if p.hidden_size != t.hidden_size:
    raise ConfigError(f"perceiver_config.hidden_size={p.hidden_size} differs from "
                      f"text_config.hidden_size={t.hidden_size}; ours runs at the text width")
  if p.hidden_act != t.hidden_act:
    raise ConfigError(f"perceiver_config.hidden_act={p.hidden_act!r} differs from "
                      f"text_config.hidden_act={t.hidden_act!r}; PerceiverConfig has one "
                      "activation for both MLPs")
  return PerceiverConfig(n_latents=p.resampler_n_latents, depth=p.resampler_depth,
                         num_heads=p.resampler_n_heads, head_dim=p.resampler_head_dim,
                         num_kv_heads=p.num_key_value_heads,
                         intermediate_size=t.intermediate_size, norm_eps=p.rms_norm_eps,
                         activation=p.hidden_act)
