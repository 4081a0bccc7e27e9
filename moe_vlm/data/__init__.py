"""Data: LLaVA-format records -> model batches, and the embedded synthetic data set.

  images.py     image loading and the pad-to-square / resize / normalise transform
  templates.py  conversation templates; tokenization with an answer-only loss mask
  tokenizer.py  a small local BPE tokenizer; offline tokenizer loading
  llava.py      random-access sources (LLaVA JSON, TFDS-style)
  pipeline.py   per-record preprocessing, bad-sample accounting, the grain pipeline
  synthetic.py  the deterministic coloured-shapes data set (captions, instructions,
                held-out QA and POPE)
"""
