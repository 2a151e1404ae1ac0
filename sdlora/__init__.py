"""sdlora: train, stack and share Stable Diffusion LoRA adapters."""

__version__ = "0.1.0"
