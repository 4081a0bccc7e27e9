"""Awaker2.5-VL's LoRA-MoE against the official layer, and its three-stage recipe.

The reference is a transcription, in PyTorch, of the released forward
(MetabrainAGI/Awaker, `Awaker2.5-VL/peft/tuners/moe/layer.py`: `LoraLinear.forward`, which
gates o_proj and gate_proj; `LoraLinear_noGate.forward`, which up_proj and down_proj run
on gate_proj's gates; `SparseDispatcher`; `RMSNorm`; and in `modeling_qwen2_vl.py` the
gate input, the detached embedding output with the image features spliced in, sliced by
`prompt_pos`), with its random draw (`torch.randn_like`) replaced by a fixed noise
tensor. Our layer (`moe_vlm.models.adapters.LoRAMoE`) is our own code; the two are
compared on tiny shapes, instance and token routing, evaluation and training (fixed
noise, dropout 0), the paper's output formula and the release's.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_vlm.convert.lora import instance_guide
from moe_vlm.data import templates
from moe_vlm.data import tokenizer as tokenizer_lib
from moe_vlm.models.adapters import LoRA, LoRAMoE, lora_dropout, masked_mean
from moe_vlm.models.config import ConfigError, LoRAMoEConfig
from moe_vlm.models.params import ParamCodec
from moe_vlm.models.vlm import VLM
from moe_vlm.parallel import mesh as mesh_lib
from moe_vlm.train.stages import LORA_FORMS, trainable_fn
from moe_vlm.train.upcycle import lora_upcycle_params
from tests.tiny import IMAGE_TOKEN, LLAMA, train_and_checkpoint, vlm_config

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


# --------------------------------------------- transcription of the official forward


class RMSNorm(nn.Module):  # layer.py (rms_norm is None: the fallback branch)
  def __init__(self, dim, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

  def forward(self, x):
    output = self._norm(x.float()).type_as(x)
    return output * self.weight


class SparseDispatcher:  # layer.py, as released (its debugging fallback left out)
  def __init__(self, num_experts, gates, token=False):
    self._gates = gates
    self._num_experts = num_experts
    self.token = token
    sorted_experts, index_sorted_experts = torch.nonzero(gates).sort(0)
    _, self._expert_index = sorted_experts.split(1, dim=1)
    self._batch_index = torch.nonzero(gates)[index_sorted_experts[:, 1], 0]
    self._part_sizes = (gates > 0).sum(0).tolist()
    gates_exp = gates[self._batch_index.flatten()]
    self._nonzero_gates = torch.gather(gates_exp, 1, self._expert_index)

  def dispatch(self, inp):
    inp_exp = inp[self._batch_index]
    return torch.split(inp_exp, self._part_sizes, dim=0)

  def combine(self, expert_out, multiply_by_gates=True):
    stitched = torch.cat(expert_out, 0)
    if multiply_by_gates:
      if self.token:
        stitched = stitched.mul(self._nonzero_gates)
      else:
        stitched = stitched.mul(self._nonzero_gates.unsqueeze(-1))
    zeros = torch.zeros(self._gates.size(0), *expert_out[-1].shape[1:], requires_grad=True,
                        device=stitched.device)
    return zeros.index_add(0, self._batch_index, stitched.float())


class OfficialLoraLinear(nn.Module):
  """`LoraLinear` (has_gate: o_proj, gate_proj) / `LoraLinear_noGate` (up_proj,
  down_proj) with multiple_loras=True, g_enable=True: adapters "0".."E-1" and "g"."""

  def __init__(self, in_features, out_features, *, r, alpha, num_experts, has_gate,
               noise_std=0.1, gates_tmp=1.0, topk=1, token=False, softmax_dtype=None,
               release=True):
    super().__init__()
    self.base = nn.Linear(in_features, out_features, bias=False)
    self.adapters = [str(i) for i in range(num_experts)] + ["g"]
    self.lora_moe_A = nn.ModuleDict({a: nn.Linear(in_features, r, bias=False)
                                     for a in self.adapters})
    self.lora_moe_B = nn.ModuleDict({a: nn.Linear(r, out_features, bias=False)
                                     for a in self.adapters})
    self.lora_moe_dropout = {a: nn.Identity() for a in self.adapters}
    self.scaling = {a: alpha / r for a in self.adapters}
    self.noise_std, self.gates_tmp, self.topk = noise_std, gates_tmp, topk
    self.num_experts, self.token = num_experts, token
    if has_gate:
      self.w_gate = nn.Linear(in_features, num_experts)
      self.ln = RMSNorm(in_features, eps=1e-6)
    # The release computes the softmax in float16 (F.softmax(..., dtype=torch.float16)).
    self.softmax_dtype = torch.float16 if softmax_dtype is None else softmax_dtype
    self.release = release  # False: the paper's y = y_e + (1 - w) y_g, gates applied once

  def gates(self, inputs_embeds, attention_mask, noise):
    """LoraLinear.forward up to the dispatcher; `noise` stands for randn_like."""
    if self.token:
      clean_logits = self.w_gate(self.ln(inputs_embeds))
    else:
      new_embeds = []
      for i in range(attention_mask.size(0)):
        prompt_embeds = inputs_embeds[i][attention_mask[i][0]: attention_mask[i][1]]
        prompt_embeds = prompt_embeds.mean(0)
        new_embeds.append(prompt_embeds)
      prompt_embeds = torch.stack(new_embeds, dim=0)
      clean_logits = self.w_gate(self.ln(prompt_embeds))
    raw_noise_stddev = self.noise_std
    noise_stddev = raw_noise_stddev * self.training
    noisy_logits = clean_logits + (noise * noise_stddev)
    logits = noisy_logits
    logits = F.softmax(logits / self.gates_tmp, dim=1, dtype=self.softmax_dtype)
    top_logits, top_indices = logits.topk(min(self.topk + 1, self.num_experts), dim=1)
    top_k_logits = top_logits[:, :self.topk]
    top_k_indices = top_indices[:, :self.topk]
    top_k_gates = top_k_logits
    zeros = torch.zeros_like(logits, requires_grad=True)
    return zeros.scatter(1, top_k_indices, top_k_gates)

  def forward(self, x, gates):
    """The shared part of both forwards, from `result = self._linear(x)`."""
    result = self.base(x)
    if self.token:
      bs, sl, _ = x.size()
      x = x.view(bs * sl, -1)
    dispatcher = SparseDispatcher(self.num_experts, gates, token=self.token)
    expert_inputs = list(dispatcher.dispatch(x))
    expert_outputs = []
    for i, adpt in enumerate(self.adapters[:-1]):
      expert_outputs.append(self.lora_moe_B[adpt](self.lora_moe_A[adpt](
          self.lora_moe_dropout[adpt](expert_inputs[i]))) * self.scaling[adpt])
    y_e = dispatcher.combine(expert_outputs)
    y_g = self.lora_moe_B["g"](self.lora_moe_A["g"](self.lora_moe_dropout["g"](x))) * \
        self.scaling["g"]
    if self.token:
      w = gates.max(dim=1)[0].unsqueeze(-1)
    else:
      w = gates.max(dim=1)[0].unsqueeze(-1).unsqueeze(-1)
    y = y_e * w + y_g * (1 - w) if self.release else y_e + y_g * (1 - w)
    if self.token:
      y = y.view(bs, sl, -1)
    result += y
    return result


def find_n_position(target_list, target_value, n):  # the release README's prompt_pos
  count = 0
  for i, element in enumerate(target_list):
    if element == target_value:
      count += 1
      if count == n:
        return i
  return -1


# ------------------------------------------------------------------ ours, same weights

D, FF, R, E = 8, 12, 4, 3  # router/hidden width, MLP width, rank, experts
SHAPES = {"wi_gate": (D, FF, None, None), "wi_up": (D, FF, None, None),
          "wo": (FF, D, None, None)}


def _pair(cfg: LoRAMoEConfig, softmax_dtype=torch.float32, seed=0):
  """Our MLP group (one router for gate/up/down) and the official layers, same weights."""
  rng = np.random.default_rng(seed)
  ours = LoRAMoE(cfg, D, SHAPES, rngs=nnx.Rngs(0))
  theirs = {}
  for name, (din, dout, _, _) in SHAPES.items():
    t = OfficialLoraLinear(din, dout, r=cfg.rank, alpha=cfg.alpha, num_experts=E,
                           has_gate=name == "wi_gate", noise_std=cfg.noise_std,
                           gates_tmp=cfg.temperature, topk=cfg.top_k,
                           token=cfg.routing == "token", softmax_dtype=softmax_dtype,
                           release=cfg.release_double_gate)
    a = rng.normal(0, 0.5, (E, din, cfg.rank)).astype(np.float32)
    b = rng.normal(0, 0.5, (E, cfg.rank, dout)).astype(np.float32)
    sa = rng.normal(0, 0.5, (din, cfg.rank)).astype(np.float32)
    sb = rng.normal(0, 0.5, (cfg.rank, dout)).astype(np.float32)
    getattr(ours, f"{name}_a").set_value(jnp.asarray(a))
    getattr(ours, f"{name}_b").set_value(jnp.asarray(b))
    getattr(ours, f"{name}_shared_a").set_value(jnp.asarray(sa))
    getattr(ours, f"{name}_shared_b").set_value(jnp.asarray(sb))
    with torch.no_grad():
      t.base.weight.copy_(torch.from_numpy(rng.normal(0, 0.5, (dout, din)).astype(np.float32)))
      for i in range(E):  # torch Linear weights are [out, in]: our kernels transposed
        t.lora_moe_A[str(i)].weight.copy_(torch.from_numpy(a[i].T))
        t.lora_moe_B[str(i)].weight.copy_(torch.from_numpy(b[i].T))
      t.lora_moe_A["g"].weight.copy_(torch.from_numpy(sa.T))
      t.lora_moe_B["g"].weight.copy_(torch.from_numpy(sb.T))
    theirs[name] = t
  gate = rng.normal(0, 1.0, (D, E)).astype(np.float32)
  bias = rng.normal(0, 0.5, (E,)).astype(np.float32)
  norm = rng.uniform(0.5, 1.5, (D,)).astype(np.float32)
  ours.router.set_value(jnp.asarray(gate))
  ours.router_bias.set_value(jnp.asarray(bias))
  ours.router_norm.scale.set_value(jnp.asarray(norm))
  with torch.no_grad():
    g = theirs["wi_gate"]
    g.w_gate.weight.copy_(torch.from_numpy(gate.T))
    g.w_gate.bias.copy_(torch.from_numpy(bias))
    g.ln.weight.copy_(torch.from_numpy(norm))
  return ours, theirs


BS, SL = 3, 7
PROMPT_POS = np.asarray([[1, 5], [0, 7], [2, 4]])  # [start, end) per row


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  embeds = rng.normal(0, 1.0, (BS, SL, D)).astype(np.float32)
  x = rng.normal(0, 1.0, (BS, SL, D)).astype(np.float32)
  h = rng.normal(0, 1.0, (BS, SL, FF)).astype(np.float32)
  return embeds, x, h


def _ours(ours: LoRAMoE, embeds, x, h, train, rng):
  cfg = ours.cfg
  if cfg.routing == "instance":
    span = (np.arange(SL)[None] >= PROMPT_POS[:, :1]) & (np.arange(SL)[None] < PROMPT_POS[:, 1:])
    u = masked_mean(jnp.asarray(embeds), jnp.asarray(span))[:, None]
  else:
    u = jnp.asarray(embeds)
  weights, shared = ours.route(u, train=train, rng=rng)
  # The release's base projections, our deltas: compared on the LoRA part + base.
  out = {}
  for name, inp in (("wi_gate", x), ("wi_up", x), ("wo", h)):
    out[name] = np.asarray(ours.delta(name, jnp.asarray(inp), weights, shared))
  return weights, shared, out


def _theirs(theirs, embeds, x, h, train, noise):
  gate = theirs["wi_gate"]
  for t in theirs.values():
    t.train(train)
  e = torch.from_numpy(embeds)
  token = gate.token
  with torch.no_grad():
    # Token mode: the released LoraLinear flattens x to [bs*sl, d] but not the gate
    # input, which would then be softmaxed over the sequence; the per-token rows it
    # evidently means are what is transcribed here.
    gates = gate.gates(e.reshape(BS * SL, D) if token else e, torch.from_numpy(PROMPT_POS),
                       torch.from_numpy(noise))
    out = {}
    for name, inp in (("wi_gate", x), ("wi_up", x), ("wo", h)):
      t = theirs[name]
      xi = torch.from_numpy(inp)
      out[name] = (t(xi, gates) - t.base(xi)).numpy()  # the LoRA part
  return gates.float().numpy(), out


CASES = [dict(routing=r, top_k=k, release_double_gate=rel)
         for r in ("instance", "token") for k in (1, 2) for rel in (False, True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("train", [False, True])
def test_lora_moe_equals_the_official_layer(case, train):
  cfg = LoRAMoEConfig(num_experts=E, rank=R, alpha=2.0 * R, dropout=0.0, noise_std=0.5,
                      temperature=0.7, **case)
  ours, theirs = _pair(cfg)
  embeds, x, h = _inputs()
  rng = jax.random.key(3)
  weights, shared, got = _ours(ours, embeds, x, h, train, rng)
  # The same noise on both sides: our draw, handed to the transcription as randn_like.
  n_rows = BS * SL if cfg.routing == "token" else BS
  noise = np.asarray(jax.random.normal(rng, (BS, SL if cfg.routing == "token" else 1, E)))
  gates, want = _theirs(theirs, embeds, x, h, train, noise.reshape(n_rows, E))
  g_max = gates.max(-1)
  # The global expert's weight is 1 - G_max; the routed weights are the top-k gates
  # (times G_max again in the release's formula).
  np.testing.assert_allclose(np.asarray(shared).reshape(-1), 1.0 - g_max, atol=1e-6)
  routed = gates * (g_max[:, None] if cfg.release_double_gate else 1.0)
  np.testing.assert_allclose(np.asarray(weights).reshape(n_rows, E), routed, atol=1e-6)
  assert ((gates > 0).sum(-1) == cfg.top_k).all()
  for name in SHAPES:
    np.testing.assert_allclose(got[name], want[name], atol=2e-5, rtol=1e-5, err_msg=name)
  if train:  # the noise acts in training (and only there: the eval case has none)
    _, _, still = _ours(ours, embeds, x, h, False, None)
    assert any(np.abs(still[n] - got[n]).max() > 1e-4 for n in SHAPES)


@pytest.mark.parametrize("routing", ["instance", "token"])
def test_lora_moe_equals_the_release_with_its_float16_softmax(routing):
  """The release's softmax runs in float16: the gates then agree to its precision."""
  cfg = LoRAMoEConfig(num_experts=E, rank=R, alpha=2.0 * R, dropout=0.0, routing=routing,
                      release_double_gate=True)
  ours, theirs = _pair(cfg, softmax_dtype=torch.float16)
  embeds, x, h = _inputs()
  _, _, got = _ours(ours, embeds, x, h, False, None)
  n_rows = BS * SL if routing == "token" else BS
  _, want = _theirs(theirs, embeds, x, h, False, np.zeros((n_rows, E), np.float32))
  for name in SHAPES:
    scale = np.abs(want[name]).max()
    np.testing.assert_allclose(got[name] / scale, want[name] / scale, atol=3e-3, err_msg=name)


def test_plain_lora_equals_peft_and_dropout_acts_only_in_training():
  """q/k/v: peft's LoRA Linear, result + lora_B(lora_A(dropout(x))) * alpha / r."""
  cfg = LoRAMoEConfig(rank=R, alpha=3.0 * R, dropout=0.3)
  lora = LoRA(cfg, {"query": (D, FF, None, None)}, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(D, R)).astype(np.float32), rng.normal(size=(R, FF)).astype(np.float32)
  lora.query_a.set_value(jnp.asarray(a))
  lora.query_b.set_value(jnp.asarray(b))
  x = rng.normal(size=(2, 5, D)).astype(np.float32)
  A, B = nn.Linear(D, R, bias=False), nn.Linear(R, FF, bias=False)
  with torch.no_grad():
    A.weight.copy_(torch.from_numpy(a.T))
    B.weight.copy_(torch.from_numpy(b.T))
    want = (B(A(torch.from_numpy(x))) * 3.0).numpy()
  np.testing.assert_allclose(np.asarray(lora.delta("query", jnp.asarray(x))), want, rtol=1e-5,
                             atol=1e-5)
  # Training (an rng): torch's dropout semantics, zeroed inputs and the rest scaled.
  key = jax.random.key(0)
  dropped = np.asarray(lora_dropout(jnp.asarray(x), 0.3, key))
  kept = dropped != 0
  assert 0.5 < kept.mean() < 0.9
  np.testing.assert_allclose(dropped[kept], x[kept] / 0.7, rtol=1e-6)
  with torch.no_grad():
    want = (B(A(torch.from_numpy(dropped))) * 3.0).numpy()
  np.testing.assert_allclose(np.asarray(lora.delta("query", jnp.asarray(x), key)), want,
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------- the gate input: span and RMSNorm

QWEN2_VL_CHAT = (  # Qwen2-VL's chat template, for string contents
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok"))
  corpus = ["You are a helpful assistant.", "What colour is the square on the left?",
            "user assistant system", "The square is red."] * 20
  tokenizer_lib.train_tokenizer(corpus, path, vocab_size=300)
  tok = tokenizer_lib.load_tokenizer(path)
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                         replace_extra_special_tokens=False)
  tok.chat_template = QWEN2_VL_CHAT
  return tok


def _tiny_lora_vlm(routing="instance", **kw):
  base = vlm_config(LLAMA)
  lora = LoRAMoEConfig(num_experts=3, top_k=1, rank=2, alpha=4.0, routing=routing, **kw)
  return dataclasses.replace(base, text=dataclasses.replace(base.text, lora_moe=lora))


def test_gate_input_is_the_rmsnormed_mean_from_the_image_to_the_end_of_the_first_turn(
    chat_tokenizer):
  tok = chat_tokenizer
  cfg = _tiny_lora_vlm()
  conv = [{"from": "human", "value": "<image>\nWhat colour is the square?"},
          {"from": "gpt", "value": "The square is red."},
          {"from": "human", "value": "What colour is the square on the left?"},
          {"from": "gpt", "value": "red"}]
  enc = templates.tokenize_conversation(conv, tok, "hf_chat",
                                        num_image_tokens=cfg.num_image_tokens,
                                        image_token_id=IMAGE_TOKEN, max_length=128)
  ids = enc.input_ids[:enc.num_tokens].tolist()
  im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
  assert tok.decode(ids[:4]).startswith("<|im_start|>system")  # a system turn first
  # The release's prompt_pos: the image start (Qwen2-VL's <|vision_start|>; here the
  # first image token) to the second <|im_end|>, the end of the first user turn.
  start, end = ids.index(IMAGE_TOKEN), find_n_position(ids, im_end, 2)
  assert 0 < start < end and end < int(np.argmax(enc.loss_mask))
  want = np.zeros_like(enc.router_mask)
  want[start:end] = 1
  np.testing.assert_array_equal(enc.router_mask, want)
  prompt, span = templates.encode_prompt(conv[:1], tok, "hf_chat",
                                         num_image_tokens=cfg.num_image_tokens,
                                         image_token_id=IMAGE_TOKEN, with_router_mask=True)
  np.testing.assert_array_equal(span, want[:len(prompt)])  # inference marks the same span
  # Text only: from the user's text on (the release starts 2 tokens after the second
  # <|im_start|>, i.e. also at the role's newline: one token more, see README).
  text = templates.tokenize_conversation(conv[2:], tok, "hf_chat", num_image_tokens=4,
                                         image_token_id=IMAGE_TOKEN, max_length=128)
  tids = text.input_ids[:text.num_tokens].tolist()
  marked = np.flatnonzero(text.router_mask)
  assert marked[-1] + 1 == find_n_position(tids, im_end, 2)
  assert tok.decode(tids[marked[0]:marked[-1] + 1]) == "What colour is the square on the left?"
  assert marked[0] - find_n_position(tids, im_start, 2) in (2, 3)

  # The gate input: the embeddings with the image features spliced in, averaged over
  # the span, RMSNorm (learnable weight), then the biased linear gate.
  model = VLM(cfg, rngs=nnx.Rngs(0))
  group = model.llm.layers[0].lora_mlp
  rng = np.random.default_rng(0)
  group.router_norm.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, LLAMA.hidden_size),
                                                jnp.float32))
  group.router_bias.set_value(jnp.asarray(rng.normal(size=3), jnp.float32))
  ids_b = jnp.asarray(enc.input_ids[None] % cfg.text.vocab_size)  # the tiny vocabulary
  ids_b = jnp.where(jnp.asarray(enc.input_ids[None]) == IMAGE_TOKEN, IMAGE_TOKEN, ids_b)
  pixels = jnp.asarray(rng.normal(size=(1, 28, 28, 3)), jnp.float32)
  guide = instance_guide(model, ids_b, pixels, enc.router_mask[None])
  embeds = model.llm.embed_tokens(ids_b)
  from moe_vlm.models.vlm import splice_image_features
  embeds = splice_image_features(embeds, model.image_features(pixels), ids_b == IMAGE_TOKEN)
  t = OfficialLoraLinear(LLAMA.hidden_size, 4, r=2, alpha=4.0, num_experts=3, has_gate=True)
  with torch.no_grad():
    t.ln.weight.copy_(torch.from_numpy(np.asarray(group.router_norm.scale[...])))
    t.w_gate.weight.copy_(torch.from_numpy(np.asarray(group.router[...]).T))
    t.w_gate.bias.copy_(torch.from_numpy(np.asarray(group.router_bias[...])))
    e = torch.from_numpy(np.asarray(embeds))
    prompt_embeds = e[0][start:end].mean(0)[None]
    want_norm = t.ln(prompt_embeds).numpy()
    want_logits = t.w_gate(t.ln(prompt_embeds)).numpy()
  np.testing.assert_allclose(np.asarray(guide), prompt_embeds.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(group.router_norm(guide)), want_norm, atol=1e-5)
  np.testing.assert_allclose(np.asarray(group.logits(guide)), want_logits, atol=1e-5)


def test_model_routes_on_the_router_span_not_the_prompt():
  """The instance router reads `router_mask`: the system prompt before the image does
  not move the routing (it does through the prompt-wide mean without a router span)."""
  cfg = _tiny_lora_vlm(dropout=0.0)
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  rng = np.random.default_rng(0)
  params = {k: (jnp.asarray(rng.normal(0, 0.5, v.shape), v.dtype) if ".lora_" in k else v)
            for k, v in codec.flatten(model).items()}
  params["llm.embed"] = params["llm.embed"] * 50.0
  model = codec.merge(params)
  n = cfg.num_image_tokens
  ids = np.concatenate([[5, 6, 7], [IMAGE_TOKEN] * n, [8, 9, 10, 11]])[None]
  span = np.zeros_like(ids)
  span[:, 3:3 + n + 3] = 1
  pixels = jnp.asarray(rng.normal(size=(1, 28, 28, 3)), jnp.float32)
  guide = lambda i: instance_guide(model, jnp.asarray(i), pixels, span)
  other = ids.copy()
  other[0, :3] = [20, 21, 22]  # another system prompt
  np.testing.assert_array_equal(np.asarray(guide(ids)), np.asarray(guide(other)))
  # The model's own routing reads the same span: its LoRA deltas at the last token
  # differ between the two prompts only through attention (checked: routing the same).
  group = model.llm.layers[0].lora_mlp
  w1, _ = group.route(guide(ids)[:, None])
  w2, _ = group.route(guide(other)[:, None])
  np.testing.assert_array_equal(np.asarray(w1), np.asarray(w2))
  full = lambda i: model(jnp.asarray(i), pixels, router_mask=jnp.asarray(span))[0]
  prompt_wide = lambda i: model(jnp.asarray(i), pixels)[0]
  assert np.abs(np.asarray(full(ids)) - np.asarray(prompt_wide(ids))).max() > 1e-4


# -------------------------------------------------------------- the three-stage recipe


def _stage_cfg(form, **kw):
  cfg = _tiny_lora_vlm(**kw)
  lm = dataclasses.replace(cfg.text.lora_moe, single=form == "single")
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, lora_moe=lm))


def _randomized(params, seed=0, scale=0.3):
  rng = np.random.default_rng(seed)
  return {k: (np.asarray(rng.normal(0, scale, v.shape), v.dtype)
              if ".lora_" in k and k.endswith("_b") else np.asarray(v))
          for k, v in params.items()}


def test_stage_two_starts_with_every_expert_a_copy_of_stage_one():
  single_cfg, experts_cfg = _stage_cfg("single", dropout=0.0), _stage_cfg("experts", dropout=0.0)
  single_model = VLM(single_cfg, rngs=nnx.Rngs(0))
  stage1 = _randomized(ParamCodec(single_model).flatten(single_model))
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  from moe_vlm.parallel import placement
  on_mesh = placement.place(stage1, placement.shardings(single_cfg, mesh))
  stage2 = lora_upcycle_params(on_mesh, single_cfg, experts_cfg, seed=0, mesh=mesh)
  codec = placement.abstract_codec(experts_cfg)
  assert set(stage2) == set(codec.names)
  shardings = placement.shardings(experts_cfg, mesh)
  for name, value in stage2.items():
    assert value.sharding.is_equivalent_to(shardings[name], value.ndim), name
  copied = 0
  for name, value in stage2.items():
    value = np.asarray(value)
    leaf = name.rsplit(".", 1)[1]
    if ".router" in name:
      if name.endswith("router_norm.scale"):
        np.testing.assert_array_equal(value, 1.0)
      continue
    source = name.replace("_shared_", "_")
    if source not in stage1 or source == name and value.shape == stage1[name].shape:
      np.testing.assert_array_equal(value, stage1[name], err_msg=name)  # carried over
      continue
    want = stage1[source]
    if value.ndim == want.ndim + 1:  # every routed expert
      assert value.shape[0] == 3
      for e in range(3):
        np.testing.assert_array_equal(value[e], want, err_msg=f"{name}[{e}]")
    else:  # the global expert
      np.testing.assert_array_equal(value, want, err_msg=name)
    copied += 1
    assert leaf.endswith(("_a", "_b"))
  n_layers = LLAMA.num_layers
  assert copied == n_layers * 4 * 2 * 2  # (out, wi_gate, wi_up, wo) x (A, B) x (E, global)
  # With every expert a copy, G_max E + (1 - G_max) E = E: stage II starts as the
  # function stage I ended with (the paper's formula).
  rng = np.random.default_rng(2)
  ids = rng.integers(1, IMAGE_TOKEN, (2, 12))
  ids[:, 1:1 + single_cfg.num_image_tokens] = IMAGE_TOKEN
  pixels = jnp.asarray(rng.normal(size=(2, 28, 28, 3)), jnp.float32)
  out1 = ParamCodec(single_model).merge(stage1)(jnp.asarray(ids), pixels)[0]
  host2 = {k: np.asarray(v) for k, v in stage2.items()}
  out2 = ParamCodec.abstract(lambda: VLM(experts_cfg, rngs=nnx.Rngs(0))).merge(host2)(
      jnp.asarray(ids), pixels)[0]
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out1), atol=2e-5, rtol=1e-5)


def _batch(cfg, seed=1, length=16):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, IMAGE_TOKEN, (2, length))
  ids[:, 1:1 + cfg.num_image_tokens] = IMAGE_TOKEN
  loss_mask = np.zeros((2, length), np.int32)
  loss_mask[:, -5:] = 1
  router = np.zeros((2, length), np.int32)
  router[:, 1:length - 6] = 1
  return dict(input_ids=jnp.asarray(ids, jnp.int32),
              attention_mask=jnp.ones((2, length), jnp.int32),
              loss_mask=jnp.asarray(loss_mask), router_mask=jnp.asarray(router),
              pixel_values=jnp.asarray(rng.normal(size=(2, 28, 28, 3)), jnp.float32))


# preset -> (LoRA form, what it must train)
STAGE_PRESETS = {
    "lora_single": ("single", lambda n: ".lora_" in n),
    "lora_experts_routers": ("experts", lambda n: ".lora_" in n),
    "lora_experts": ("experts", lambda n: ".lora_" in n and ".router" not in n),
}


@pytest.mark.parametrize("preset", list(STAGE_PRESETS))
def test_each_awaker_stage_trains_only_its_preset(preset, tmp_path):
  form, expected = STAGE_PRESETS[preset]
  assert LORA_FORMS[preset] == form
  cfg = _stage_cfg(form)
  model = VLM(cfg, rngs=nnx.Rngs(0))
  codec = ParamCodec(model)
  params = _randomized(codec.flatten(model))
  trainable = trainable_fn(preset)
  chosen = {n for n in params if trainable(n)}
  assert chosen == {n for n in params if expected(n)} and chosen
  if form == "experts":
    routers = {n for n in params if ".lora_" in n and ".router" in n}
    assert routers and (routers <= chosen) == (preset == "lora_experts_routers")
  # Steps of the train step: the loss falls, every frozen parameter (base, tower, and in
  # stage III the routers) stays bit-identical, the stage's final round-trips.
  state = train_and_checkpoint(codec, params, trainable, _batch(cfg), str(tmp_path / "final"),
                               lr=1e-2)
  assert set(state.params) == chosen
  moved = [n for n in chosen if not np.array_equal(np.asarray(state.params[n]), params[n])]
  assert any(".lora_qkv." in n for n in moved) and any(".lora_mlp." in n for n in moved)
  if preset == "lora_experts_routers":
    assert any(n.endswith(".router") for n in moved)


def test_presets_add_and_remove_parameter_groups():
  names = ["llm.layers.0.lora_mlp.router", "llm.layers.0.lora_mlp.router_norm.scale",
           "llm.layers.0.lora_mlp.wo_a", "llm.layers.0.lora_qkv.query_a",
           "llm.layers.0.mlp.router.kernel", "llm.layers.0.mlp.experts.wo",
           "projector.linear_1.kernel", "vision.layers.0.mlp.wi.kernel"]
  pick = lambda *a: [n for n in names if trainable_fn(*a)(n)]
  assert pick("lora_experts_routers") == names[:4]
  assert pick("lora_experts") == names[2:4]
  # The release's peft marking leaves the RMSNorm out ("moe_"/"w_gate" names only).
  assert pick("lora_experts_routers", (), (".router_norm",)) == [names[0]] + names[2:4]
  assert pick("lora_experts", (), (".lora_qkv.",)) == [names[2]]
  assert pick("moe_layers", (), (".mlp.router.",)) == [names[5]]  # experts, not routers
  assert pick("moe_layers", ("projector.",), (".mlp.router.",)) == names[5:7]
  assert pick("projector", ("projector.",), ("projector.",)) == []  # removal wins


def test_awaker_recipe_configs_are_checked(tmp_path):
  from configs import variants as variants_cfg
  from moe_vlm import schema
  from moe_vlm.experiment import Experiment
  from moe_vlm.train import loop
  c = variants_cfg.get_config("awaker")
  s = schema.parse(c)
  assert [s.stages.get(k).train for k in (1, 2, 3)] == list(STAGE_PRESETS)
  assert s.lora_moe.routing == "instance" and s.lora_moe.top_k == 1
  # Stage I trains LoRA on a frozen base: without one (init) the run stops before it.
  with pytest.raises(loop.StageSettingsError, match="no pretrained model"):
    loop.check_stages(Experiment(c, str(tmp_path)), (1, 2, 3),
                      mesh_lib.make_mesh({"data": -1}))
  bad = variants_cfg.get_config("awaker")
  bad.stages.stage2.train = "lora_single"
  bad.stages.stage1.train = "lora_experts_routers"
  with pytest.raises(ConfigError, match="lora_single stage after"):
    schema.parse(bad)
  bad = variants_cfg.get_config("awaker")
  bad.stage3_kind = "moe"
  with pytest.raises(ConfigError, match="stage3_kind='lora'"):
    schema.parse(bad)
  bad = variants_cfg.get_config("awaker")
  bad.lora_moe.single = True
  with pytest.raises(ConfigError, match="lora_moe.single"):
    schema.parse(bad)


def test_three_stage_recipe_on_the_trainer(tmp_path):
  """`moe-vlm train` on configs/variants.py:awaker (tiny): stage I from a dense base
  (init.params), II from I (its LoRA copied into every expert, on an fsdp x data mesh),
  III from II; each stage moves only its preset's parameters, III not the gates."""
  from configs import variants as variants_cfg
  from moe_vlm import checkpoint as ckpt_lib
  from moe_vlm.experiment import Experiment
  from moe_vlm.train import loop

  def tiny(c):
    c.model.vision.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    c.model.text.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                        num_kv_heads=1)
    c.data.update(num_eval_images=4, max_length=96, dir=str(tmp_path / "data"))
    c.vision_pretrain.steps = 0
    for k in (1, 2, 3):
      c.stages[f"stage{k}"].update(steps=2, batch_size=8, warmup_ratio=0.0,
                                   learning_rate=1e-2)
    c.mesh.update(data=4, fsdp=2)
    c.checkpoint.update(every_steps=100, async_save=False)
    return c

  base_exp = Experiment(tiny(variants_cfg.get_config("moe_llava")), str(tmp_path / "base"))
  base_exp.prepare_data()
  mesh = base_exp.mesh()
  base = loop.initial_params(base_exp, mesh)  # the dense model (random: the wiring is tested)
  ckpt_lib.save_params(str(tmp_path / "base" / "final"), base)
  base = {k: np.asarray(v) for k, v in base.items()}
  c = tiny(variants_cfg.get_config("awaker"))
  c.lora_moe.rank = 4
  c.init.params = str(tmp_path / "base" / "final")
  exp = loop.train(c, str(tmp_path / "awaker"), (1, 2, 3))
  s1, s2, s3 = ({n: np.asarray(v) for n, v in exp.load_params(k).items()} for k in (1, 2, 3))
  lora = lambda n: ".lora_" in n
  for k, final in ((1, s1), (2, s2), (3, s3)):  # the base never moves
    for name, value in base.items():
      np.testing.assert_array_equal(final[name], value, err_msg=f"stage {k} {name}")
    assert {n for n in final if not lora(n)} == set(base)
  assert all(s1[n].any() for n in s1 if lora(n) and n.endswith("_b"))  # stage I trained
  # Stage II: experts, the global expert and the gates trained, from stage I's LoRA.
  routers = [n for n in s2 if lora(n) and ".router" in n]
  assert routers and all(n in s3 for n in routers)
  a = next(n for n in s2 if n.endswith("lora_mlp.wo_a"))
  shared = a.replace("wo_a", "wo_shared_a")
  assert s2[a].shape == (4,) + s1[a].shape
  assert any(not np.array_equal(s2[a][e], s1[a]) for e in range(4))  # the routed ones
  assert not np.array_equal(s2[shared], s1[a])  # the global expert trains on every sample
  # Stage III: the gates bit-identical, the experts moved.
  for name in routers:
    np.testing.assert_array_equal(s3[name], s2[name], err_msg=name)
  assert all(not np.array_equal(s3[n], s2[n]) for n in s3
             if lora(n) and n.endswith("_b") and ".lora_mlp." in n)


def test_awaker_config_builds_on_a_qwen2_vl_checkpoint(tmp_path, chat_tokenizer):
  """configs/awaker.py parses, and builds its model on a Qwen2-VL checkpoint's config
  (a tiny one here): the qwen2_vl tower and merger, M-RoPE, the stage presets' LoRA."""
  import transformers
  from configs import awaker
  from moe_vlm import experiment, schema
  c = awaker.get_config()
  s = schema.parse(c)
  assert (s.lora_moe.rank, s.lora_moe.alpha, s.lora_moe.dropout) == (256, 512.0, 0.05)
  assert s.lora_moe.targets == ("qkv", "attn_out", "mlp") and s.lora_moe.top_k == 1
  assert [s.stages.get(k).train for k in (1, 2, 3)] == list(STAGE_PRESETS)
  image = experiment.ensure_image_token(chat_tokenizer, 512)
  transformers.Qwen2VLConfig(
      text_config=dict(vocab_size=512, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": [2, 1, 1]}),
      vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2),
      image_token_id=image).save_pretrained(tmp_path)
  c.init.hf_llava = str(tmp_path)
  dense = experiment.model_config(c, chat_tokenizer)
  assert dense.vision.native and dense.projector == "qwen2_vl_merger"
  assert dense.text.rope_type == "mrope" and dense.image_token_id == image
  assert dense.text.dtype == "bfloat16" and dense.text.remat == "full"
  assert experiment.stage_model_config(c, dense, 1).text.lora_moe.single
  assert not experiment.stage_model_config(c, dense, 2).text.lora_moe.single
