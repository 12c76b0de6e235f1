"""`reprotune import-axolotl`: an Axolotl config as a params.yaml, with every key accounted for.

Features
- One table (KEYS, DATASET_KEYS, PATTERNS) says what becomes of each Axolotl key: mapped (same meaning,
  to a named params key), translated (a different spelling of the same training: optimizer names,
  `adapter: qlora`, evals_per_epoch), ignored (the pipeline does it already, or it only makes a GPU run
  faster or leaner and the model trained is the same) or unsupported (with the reason and the nearest
  alternative). The README's key map is printed from the same table (`python -m reprotune.axolotl`).
- Numbers as Axolotl reads them: YAML 1.1 reads `2e-5` (no dot) as a string, Axolotl's pydantic config
  as a number; here too, for every key Axolotl types as a number.
- The output keeps the comments of the project's params.yaml; values are Axolotl's where it sets them
  and reprotune's documented defaults (config/sections.py) elsewhere, never the built-in model's tuning
  in the shipped params.yaml. The result is checked as `reprotune check` would.
- Empty values (`wandb_project:`) are unset, as Axolotl reads them; an unsupported feature set to false
  (`load_in_8bit: false`) is ignored.
- Exit codes: 0 when every key is mapped, translated or ignored and the output passes the check; 2 when a
  key cannot be honoured or the check fails (the output is still written, so it can be fixed by hand).

Trade-offs
- A key this table does not know is unsupported (exit 2), not guessed at: Axolotl has hundreds of keys
  and a silently dropped one changes the training.
- Values are translated one key at a time, plus the few pairs Axolotl reads together (adapter with
  load_in_4bit, lora_target_linear with lora_target_modules, eval/save steps with their per-epoch forms).


Modules
- rules.py: the statuses, Rule (what becomes of a key) and Row (one line of the report).
- values.py: translators for values spelt differently here (optimizer names, adapter, batch_size, ...).
- keys.py: the key map (KEYS, PATTERNS, DATASET_KEYS).
- translate.py: a config through the map into params.
- output.py: params.yaml in the project's layout, the report, the README's key map, `import_axolotl`.
"""

from reprotune.axolotl.output import import_axolotl, key_map_markdown, write_key_map
from reprotune.axolotl.rules import IGNORED, MAPPED, TRANSLATED, UNSUPPORTED
from reprotune.axolotl.translate import params_from, translate

__all__ = [
    "IGNORED",
    "MAPPED",
    "TRANSLATED",
    "UNSUPPORTED",
    "import_axolotl",
    "key_map_markdown",
    "params_from",
    "translate",
    "write_key_map",
]
