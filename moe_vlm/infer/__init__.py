"""moe_vlm.infer: KV-cache generation (generate), sampling, loading trained models from a
workdir (load), batched VQA answers (vqa) and multi-turn chat (chat)."""
