"""Supervised fine-tuning of an MoE model with TRL + PEFT, the BiMediX way (same parser as ``bimedix sft``).

```bash
accelerate launch recipes/sft.py --config recipes/tiny/sft.yaml
accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero2.yaml \
    recipes/sft.py --config recipes/bimedix-mixtral/sft_qlora.yaml
```
"""

from bimedix.training.sft import main, make_parser

if __name__ == "__main__":
    parser = make_parser()
    main(*parser.parse_args_and_config())
