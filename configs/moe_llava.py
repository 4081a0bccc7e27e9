"""MoE-LLaVA's released variants, trained from HF checkpoints on disk.

  moe-vlm train --config configs/moe_llava.py:phi2 --workdir gs://bucket/moe-llava-phi2 \
      --config.init.hf_vision=/ckpt/clip-vit-large-patch14-336 \
      --config.init.hf_llm=/ckpt/phi-2 --config.data.dir=/data/moe-llava

Variants (the argument after the colon): stablelm (StableLM-2-1.6B), qwen (Qwen1.5-1.8B),
phi2 (Phi-2 2.7B), each with CLIP ViT-L/14-336 (576 image tokens), and phi2_siglip
(Phi-2 with SigLIP-so400m-384; MoE-LLaVA drops SigLIP's token 0, so 728 tokens).
The LLM and vision architectures come from the checkpoints' config.json; the tokenizer
from the LLM directory. Stage settings are the paper's (MoE-LLaVA Phi-2 scripts):

| stage | trains                | data                               | batch | lr   |
| 1     | projector             | LLaVA-PT 558k, `plain` template    | 256   | 1e-3 |
| 2     | projector + LLM       | LA-tune, LRV, LVIS, SViT, NLP      | 128   | 2e-5 |
| 3     | experts + routers     | LLaVA-mix-665k + NLP               | 128   | 2e-5 |
1 epoch each, warmup 3%, cosine, no weight decay, max length 2048, bf16, remat.
Rows are packed (`data.packing="first_fit"`): several samples per 2048-token row, each
attending only to itself, instead of every sample padded to 2048 (a stage-1 sample is
576 image tokens and a caption). The reference pads each batch to its longest sample.
MoE: 4 experts, top-2, every other layer, capacity 1.5 (eval 2.0), aux coef 0.01.
The data file names are the MoE-LLaVA release's; override `stages.stageK.data`.
"""

from moe_vlm import schema

HEAD_FRACTION = 0.5  # answers: well under half of a 2048-token row (576 are image tokens)

VARIANTS = {
    # name: (conversation template, image normalisation)
    "stablelm": ("stablelm", "clip"),
    "qwen": ("qwen", "clip"),
    "phi2": ("phi", "clip"),
    "phi2_siglip": ("phi", "siglip"),
}

STAGE2_DATA = ",".join([
    "train_json/la_tune_256k.json", "train_json/lrv_tune_331k.json",
    "train_json/lvis_tune_220k_.json", "train_json/svit_tune_157k.json",
    "train_json/nlp_tune.json"])
STAGE3_DATA = "train_json/llava_image_tune_.json,train_json/nlp_tune.json"


def stage(train, data, template, *, batch_size, lr):
  return dict(train=train, data=data, template=template, batch_size=batch_size,
              steps=0, epochs=1, learning_rate=lr, warmup_ratio=0.03, weight_decay=0.0,
              head_fraction=HEAD_FRACTION)


def get_config(variant: str = "phi2"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/moe_llava.py:{variant}: expected one of {sorted(VARIANTS)}")
  template, norm = VARIANTS[variant]
  return schema.block(
      schema.ExperimentConfig,
      seed=0,
      variant=variant,
      # Architecture: read from the checkpoints named in `init`; these fields only set
      # execution details (dtype, remat) and the LLaVA wiring.
      model=dict(vision=dict(dtype="bfloat16"), text=dict(dtype="bfloat16", remat="full"),
                 projector="mlp2x_gelu", vision_feature_layer=-2,
                 vision_feature_select_strategy="default"),
      # DeepSpeed routes each GPU's micro-batch (4 sequences) on its own: group_size=4.
      moe=dict(num_experts=4, top_k=2, moe_mode="sparse", dispatch="capacity",
               capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0, group_size=4,
               renormalize=True, aux_loss_coef=0.01),
      init=dict(
          hf_vision="/ckpt/" + ("siglip-so400m-patch14-384" if norm == "siglip"
                                else "clip-vit-large-patch14-336"),
          hf_llm="/ckpt/" + {"stablelm": "stablelm-2-1_6b", "qwen": "Qwen1.5-1.8B",
                             "phi2": "phi-2", "phi2_siglip": "phi-2"}[variant]),
      data=dict(kind="llava_json", dir="/data/moe-llava", max_length=2048,
                packing="first_fit", normalization=norm, worker_count=16,
                max_bad_fraction=0.01),
      mesh=dict(data=-1, fsdp=1, model=1, expert=1),
      stages=dict(
          stage1=stage("projector", "train_json/llava_image_.json", "plain", batch_size=256,
                       lr=1e-3),
          stage2=stage("projector_llm", STAGE2_DATA, template, batch_size=128, lr=2e-5),
          # "moe_llava_code" trains what the reference code really does (all FFNs +
          # projector).
          stage3=stage("moe_layers", STAGE3_DATA, template, batch_size=128, lr=2e-5)),
      checkpoint=dict(every_steps=500, keep=3, async_save=True),
      log_every=10,
      eval=dict(batch_size=64, max_new_tokens=16, max_examples=0, run_after_training=False))
