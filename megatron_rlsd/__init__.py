"""megatron_rlsd: RLSD (RLVR with Self-Distillation) on Megatron-Core with vLLM rollouts."""

import warnings

# Megatron-Core warns at import, once per module, when Transformer Engine or Apex is missing. The
# layer spec is chosen explicitly here (model.transformer_impl; on GPU a missing Transformer Engine
# is refused with one line), so these say nothing a user must act on.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed", category=UserWarning)
