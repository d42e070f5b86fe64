"""Export a run's LoRA (or a training checkpoint's) for ComfyUI / A1111 / Forge / Fooocus or diffusers:
``python src/export_lora.py outputs/train/can/<date>/checkpoints/step_000250.ckpt --format kohya``."""

from dreammix.export import main

if __name__ == "__main__":
    main()
