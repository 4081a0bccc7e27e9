"""The embedded default: all three MoE-Tuning stages on locally generated synthetic data.

Images of coloured shapes (32 px, 16 patches of 8 px), a BPE tokenizer trained on the
data set's own text, a CLIP-style ViT and a Llama-style decoder small enough that the
three stages finish in minutes on 2 CPU cores. Stage settings follow MoE-LLaVA
(stage 1 projector only with the `plain` template at a high LR; stage 2 projector +
LLM; stage 3 upcycled to 4 experts top-2 in every other layer, MoE layers only) with
step counts and learning rates scaled to the tiny model.

  moe-vlm train --config configs/synthetic_tiny.py --workdir /tmp/moe_vlm_demo
"""

from moe_vlm import schema

HEAD_FRACTION = 0.25  # answers are at most 31 of 128 positions in the generated data


def stage(train, data, template, *, steps, lr, batch_size=32, warmup_ratio=0.03,
          weight_decay=0.0):
  return dict(train=train, data=data, template=template, batch_size=batch_size,
              steps=steps, epochs=0, learning_rate=lr, warmup_ratio=warmup_ratio,
              weight_decay=weight_decay, head_fraction=HEAD_FRACTION)


def get_config():
  # Every field of every block exists (moe_vlm/schema.py); these are the ones that
  # differ from the schema's defaults.
  return schema.block(
      schema.ExperimentConfig,
      seed=0,
      model=dict(
          vision=dict(variant="clip", image_size=32, patch_size=8, hidden_size=64,
                      intermediate_size=128, num_layers=3, num_heads=4,
                      activation="quick_gelu"),
          # vocab_size 0: the tokenizer's size rounded up to a multiple of 64.
          text=dict(family="llama", vocab_size=0, hidden_size=128, intermediate_size=256,
                    num_layers=4, num_heads=4, num_kv_heads=2, norm="rms", norm_eps=1e-6,
                    mlp="gated", activation="silu", rope_theta=10000.0),
          projector="mlp2x_gelu", vision_feature_layer=-2,
          vision_feature_select_strategy="default"),
      # Stage 3's MoE (MoE-LLaVA defaults: 4 experts, top-2, every other layer,
      # capacity 1.5).
      moe=dict(num_experts=4, top_k=2, moe_mode="sparse", dispatch="capacity",
               capacity_factor=1.5, eval_capacity_factor=2.0),
      # Training samples are computed per index (a new image for each); the held-out
      # set (eval.json, pope.json) is written into <workdir>/data.
      data=dict(kind="synthetic", num_images=0, num_eval_images=150, image_size=32,
                grid=2, max_length=128, normalization="clip", max_bad_fraction=0.05,
                eval_file="eval.json", pope_file="pope.json"),
      mesh=dict(data=-1, fsdp=1, model=1, expert=1),
      # The stand-in for CLIP's pre-training: the tower learns to caption, then stays
      # frozen through stages 1-3 (moe_vlm/train/pretrain_vision.py).
      vision_pretrain=dict(steps=300, batch_size=64, learning_rate=1e-3, warmup_ratio=0.05,
                           data="captions", decoder_layers=1,
                           head_fraction=HEAD_FRACTION),
      stages=dict(
          stage1=stage("projector", "captions", "plain", steps=150, lr=1e-3),
          stage2=stage("projector_llm", "instruct", "phi", steps=900, lr=1e-3),
          stage3=stage("moe_layers", "qa", "phi", steps=300, lr=5e-4)),
      checkpoint=dict(every_steps=100, keep=2, async_save=True),
      log_every=25,
      eval=dict(batch_size=64, max_new_tokens=4, max_examples=0, run_after_training=True))
