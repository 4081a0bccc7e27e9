"""moe_vlm.eval: scoring benchmarks and analysing routing.

  metrics    VQA answer normalisation / accuracy, POPE yes-no reading and metrics
  questions  question files in (LLaVA JSONL, synthetic JSON), LLaVA answer JSONL out
  runner     batched greedy answering through `infer.generate.greedy_generate`
  tasks      `moe-vlm eval` tasks: pope, vqa, routing -> answers, results.json/.md
  routing    per-layer expert shares by modality, top-1 paths, tables and figures
  report     the stage-2 vs stage-3 report written after training
"""
