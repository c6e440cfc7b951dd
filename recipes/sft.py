"""Supervised fine-tuning of an MoE model with TRL + PEFT, the BiMediX way (same parser as ``bimedix sft``).

```bash
accelerate launch recipes/sft.py --config recipes/tiny/sft.yaml
accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero2.yaml \
    recipes/sft.py --config recipes/bimedix-mixtral/sft_qlora.yaml
```

Errors are reported as by ``bimedix sft``: one line naming the problem and the fix, exit status 2
(set ``BIMEDIX_TRACEBACK=1`` to see the traceback); Ctrl-C exits with 130.
"""

import logging
import os
import sys

from bimedix.core.command import run_command
from bimedix.hub.cards import save_model_card
from bimedix.training.sft import main, parse_args


def sft() -> None:
    """Parse the recipe and flags, train, and write the model card with the final files."""
    main(*parse_args(), finish=save_model_card)


if __name__ == "__main__":
    # bimedix's start-up lines (how the model is placed, what was quantized) at INFO; libraries at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bimedix").setLevel(logging.INFO)
    sys.exit(run_command("recipes/sft.py", sft, verbose=os.environ.get("BIMEDIX_TRACEBACK") == "1"))
