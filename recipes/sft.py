"""Supervised fine-tuning of an MoE model with TRL + PEFT, the BiMediX way (same parser as ``bimedix sft``).

```bash
accelerate launch recipes/sft.py --config recipes/tiny/sft.yaml
accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero2.yaml \
    recipes/sft.py --config recipes/bimedix-mixtral/sft_qlora.yaml
```
"""

from bimedix.hub.cards import save_model_card
from bimedix.training.sft import main, make_parser

if __name__ == "__main__":
    parser = make_parser()
    trainer = main(*parser.parse_args_and_config())
    if trainer.accelerator.is_main_process:
        save_model_card(trainer.args.output_dir)
