"""python -m bat_models: build (once) and print the local Hugging Face folder of the default model."""

from .hf_folder import smollm2_hf_folder

print(smollm2_hf_folder())
