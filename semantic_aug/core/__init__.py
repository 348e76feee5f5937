"""The bottom layer: files and models every stage uses (utilities and errors, the Stable Diffusion loader, token
files, classifiers, a run's file layout). It imports nothing else of `semantic_aug`."""
