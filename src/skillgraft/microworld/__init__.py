"""The micro-world: a synthetic image/text world, its tiny trained model zoo, and the demo.

- `world`: seeded scenes, real RGB images, English/French questions, format instructions, arithmetic
- `tokenizer`: the word-level tokenizer (tokenizer.json, with an `<image>` token)
- `build`: trains base, experts and the LLaVA VLM from seed on CPU (`skillgraft zoo build`)
- `zoo`: the shipped checkpoints (`skillgraft zoo path NAME`)
- `taskvec`: in-memory task arithmetic on a loaded VLM (scale sweeps without writing checkpoints)
- `demo`: `skillgraft demo`
"""
