"""The micro-world: a synthetic image/text world, its tiny trained model zoo, and the demo.

- `world`: seeded scenes, real RGB images, English/French questions, format instructions, arithmetic
- `tokenizer`: the word-level tokenizer (tokenizer.json, with an `<image>` token)
- `build`: trains base, experts and the LLaVA VLM from seed on CPU (`skillgraft zoo build`)
- `zoo`: the shipped checkpoints (`skillgraft zoo path NAME`)
- `scenarios`: which skill each expert teaches
- `demo`: `skillgraft demo`
"""
