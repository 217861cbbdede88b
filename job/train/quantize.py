"""Quantised base weights (`model.base_model_precision: int8 | fp8`) through torchao.

torchao is PyTorch's own quantisation library (maintained with torch, tensor subclasses that work
with autograd, peft and torch.compile, and both weight-only int8 and float8 *training* in one
package); optimum-quanto covers the LoRA half only and is in maintenance mode.

- LoRA: after the adapters are added, every frozen `nn.Linear` (the base layers under the
  adapters and the other frozen projections) gets weight-only quantised storage: int8
  (`Int8WeightOnlyConfig`, per-channel scales) or float8 e4m3 (`Float8WeightOnlyConfig`). The
  adapters stay in float32 and train as usual; gradients flow through the quantised base to them.
- Full fine-tune with fp8: the weights stay bf16 (they are what is trained), and the matrix
  products of the transformer blocks' linear layers run in float8 with dynamic scaling
  (`convert_to_float8_training`; forward e4m3, gradients e5m2; the weight-gradient product stays
  bf16, see `_fp8_training_config`). This needs an sm89+ GPU for
  speed (preflight refuses older ones); layers whose sizes are not multiples of 16 stay bf16.
  int8 for a full fine-tune is refused by the spec rules (a frozen-base format).
"""

from __future__ import annotations

import logging

import torch

from job.errors import EnvironmentProblem

log = logging.getLogger("trainer.train")

QUANTISED = ("int8", "fp8")


def check_available(precision: str) -> None:
    """EnvironmentProblem (exit 3) at start when torchao cannot be imported."""
    try:
        import torchao  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a torchao built for another torch fails in several ways
        raise EnvironmentProblem(
            f"model.base_model_precision {precision!r} quantises with torchao, which cannot be imported "
            f"({exc.__class__.__name__}: {exc})",
            "pip install torchao (a version matching your torch), or use base_model_precision: bf16") from None


def _frozen_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not module.weight.requires_grad


def _fp8_linear(module: torch.nn.Module, fqn: str) -> bool:
    # float8 matrix products need both sizes divisible by 16; the blocks hold ~all the FLOPs
    return (isinstance(module, torch.nn.Linear) and ".transformer_blocks." in f".{fqn}."
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def _fp8_training_config():
    """Tensorwise float8 for the forward and the input-gradient products; the weight-gradient product
    in bf16. Its inner size is the token count (81x832x480 gives 32,760 tokens), which float8
    kernels need divisible by 16 and which a training run does not choose; it is also the product
    where float8 costs the most accuracy (torchao's `rowwise_with_gw_hp` recipe makes the same call)."""
    from torchao.float8 import CastConfig, Float8LinearConfig, ScalingType

    return Float8LinearConfig(cast_config_input_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED),
                              cast_config_grad_output_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED))


def quantize_base(transformer: torch.nn.Module, spec) -> int:
    """Quantise as `model.base_model_precision` says; returns the number of layers changed (0 for bf16/fp32)."""
    precision = spec.model.base_model_precision
    if precision not in QUANTISED:
        return 0
    check_available(precision)
    if precision == "fp8" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        # preflight says the same; this catches a train phase started without it
        raise EnvironmentProblem(f"fp8 needs an sm89+ GPU (Ada, Hopper or newer); {torch.cuda.get_device_name()} is "
                                 "sm{}{}".format(*torch.cuda.get_device_capability()),
                                 "use base_model_precision: bf16 (or int8 with LoRA), or an L4/L40S/RTX 40xx/H100 or newer GPU")
    if spec.model.type == "lora":
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        layers = sum(1 for name, m in transformer.named_modules() if _frozen_linear(m, name))
        config = Int8WeightOnlyConfig() if precision == "int8" else Float8WeightOnlyConfig()
        quantize_(transformer, config, filter_fn=_frozen_linear)
        log.info("frozen base quantised to %s (torchao %s): %d linear layers", precision, type(config).__name__, layers)
        return layers
    if precision != "fp8":
        raise ValueError(f"{precision} is a frozen-base format; a full fine-tune trains with bf16 or fp8")
    from torchao.float8 import convert_to_float8_training

    layers = sum(1 for name, m in transformer.named_modules() if _fp8_linear(m, name))
    if not layers:
        log.warning("fp8 training: no linear layer of the transformer blocks has sizes divisible by 16; all stay bf16")
        return 0
    convert_to_float8_training(transformer, config=_fp8_training_config(), module_filter_fn=_fp8_linear)
    log.info("fp8 training (torchao float8, dynamic scaling) for %d linear layers of the transformer blocks", layers)
    return layers
