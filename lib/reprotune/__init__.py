"""reprotune: reproducible QLoRA fine-tuning of large language models as a DVC pipeline.

The library holds all logic; `stages/*.py` are thin DVC entry points over it. Importing the
package is cheap: nothing here imports torch (so `reprotune check` and `validate` start fast).
"""

__version__ = "0.1.0"
