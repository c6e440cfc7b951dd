"""LoRA for Mixture-of-Experts models, in one place as a PEFT tuner keeps one method: which weights get
adapters (`targets`: attention, router, experts), the fused experts and their grouped matmul (`experts`),
LoRA folded into the expert forward (`expert_lora`) and 4-bit storage of the experts (`quantize`).

FSDP sharding of the 4-bit experts lives in `bimedix.training.sharding` (it is about placing a whole model on
processes, and uses `quantize`); the router-load report in `bimedix.training.router_stats` (a trainer
callback).
"""
