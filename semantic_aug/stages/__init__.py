"""The pipeline's stages: Textual Inversion, prompts and the LLM, image generation (`augmentations`), the synthetic
set, the filter (contribution (c)) and classifier training. They import `core`, `datasets` and `acceleration`,
never the runner."""
