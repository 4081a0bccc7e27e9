"""Awaker2.5-VL (arXiv 2411.10669) on Qwen2-VL-7B-Instruct, from an HF checkpoint on disk.

  moe-vlm train --config configs/awaker.py --workdir gs://bucket/awaker \
      --config.init.hf_llava=/ckpt/Qwen2-VL-7B-Instruct --config.data.dir=/data/awaker

The base model is Qwen2-VL (`moe_vlm.models.qwen2_vl`: a ViT with 2D rotary positions at
native resolution on a patch budget, `model.vision.max_pixels`; 2x2 patches merged into
one LLM token; M-RoPE in the LLM), read from `init.hf_llava` (config.json + safetensors)
with its own tokenizer (`<|image_pad|>` is the image id). The same recipe runs on the
LLaVA-style synthetic model: `configs/variants.py:awaker`.

The recipe, as the trainer's three stages on the frozen base (`train.stages`):

| stage | Awaker | preset                 | trains                                         |
| 1     | I      | `lora_single`          | one LoRA on q/k/v, o_proj, gate/up/down_proj   |
| 2     | II     | `lora_experts_routers` | stage I's LoRA copied into 4 experts + the     |
|       |        |                        | global one; experts, gates (RMSNorm + linear), |
|       |        |                        | q/k/v's LoRA                                   |
| 3     | III    | `lora_experts`         | experts and q/k/v's LoRA; gates frozen         |

The MoE as released (`lora_moe`): LoRA r=256, alpha=512, dropout 0.05; 4 task experts +
1 global, top-1, gate noise std 0.1 (training only), temperature 1; instance routing on
the detached embedding output (image features spliced in) averaged from the image start
to the end of the first user turn; the paper's output formula (`release_double_gate`
True reproduces the released code's, e.g. to run its checkpoint). The conversations are
rendered with the checkpoint's own chat template (`hf_chat`).

The release gives no learning rates, batch sizes or data files for the three stages:
those below are placeholders of ours (typical LoRA fine-tuning values), as are the data
file names; set them for your data and hardware.
"""

from moe_vlm import schema

HEAD_FRACTION = 0.5


def stage(train, *, lr, data="train.json", batch_size=128):
  return dict(train=train, data=data, template="hf_chat", batch_size=batch_size, steps=0,
              epochs=1, learning_rate=lr, warmup_ratio=0.03, weight_decay=0.0,
              head_fraction=HEAD_FRACTION)


def get_config():
  return schema.block(
      schema.ExperimentConfig,
      seed=0,
      variant="awaker2.5-vl",
      # Architecture from init.hf_llava's config.json; these set execution details only.
      model=dict(vision=dict(dtype="bfloat16"), text=dict(dtype="bfloat16", remat="full")),
      stage3_kind="lora",
      lora_moe=dict(num_experts=4, top_k=1, rank=256, alpha=512.0, dropout=0.05,
                    targets=("qkv", "attn_out", "mlp"), routing="instance",
                    shared_expert=True, temperature=1.0, noise_std=0.1,
                    release_double_gate=False),
      init=dict(hf_llava="/ckpt/Qwen2-VL-7B-Instruct"),
      data=dict(kind="llava_json", dir="/data/awaker", max_length=4096,
                normalization="clip", worker_count=16,
                max_bad_fraction=0.01),
      mesh=dict(data=-1, fsdp=1, model=1, expert=1),
      stages=dict(
          stage1=stage("lora_single", lr=2e-4),
          stage2=stage("lora_experts_routers", lr=2e-4),
          stage3=stage("lora_experts", lr=1e-4)),
      checkpoint=dict(every_steps=500, keep=3, async_save=True),
      log_every=10,
      eval=dict(batch_size=32, max_new_tokens=64, max_examples=0, run_after_training=False))
