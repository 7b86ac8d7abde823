"""phi2tutor: fine-tune Phi-2 into a math tutor with LoRA/QLoRA in fp16 on a 4 GB GPU.

The package holds everything that is not a Lightning callback (those live in the
top-level ``callbacks`` package). Importing it is cheap: heavy libraries load lazily.
"""

__version__ = "0.1.0"
