"""Quantised base weights (`model.base_model_precision: int8 | fp8`, LoRA) and float8 matrix products
(`train.mixed_precision: fp8`, full or LoRA) through torchao.

torchao is PyTorch's own quantisation library (maintained with torch, tensor subclasses that work
with autograd, peft and torch.compile, and both weight-only int8 and float8 *training* in one
package); optimum-quanto covers the LoRA half only and is in maintenance mode.

- `quantize_base` (LoRA): after the adapters are added, every frozen `nn.Linear` (the base layers
  under the adapters and the other frozen projections) gets weight-only quantised storage: int8
  (`Int8WeightOnlyConfig`, per-channel scales) or float8 e4m3 (`Float8WeightOnlyConfig`). The
  adapters stay in float32 and train as usual; gradients flow through the quantised base to them.
  This saves memory, not time (the products still run in bf16).
- `enable_fp8_matmuls` (`train.mixed_precision: fp8`): the weights stay what they were (bf16; a
  full fine-tune trains them), and the transformer blocks' matrix products run in float8 with
  dynamic tensorwise scaling (forward e4m3, gradients e5m2; the input-gradient products with fast
  accumulation unless `speed.fp8_fast_accumulation` is off): the linear layers and the feed-forward's
  1x1 and temporal convolutions, which are ~62 % of the model's FLOPs but convs in the checkpoint (the
  fused feed-forward calls the product, `speed.set_feedforward_matmul`; inside compiled blocks only).
  A full fine-tune with `speed.fp8_weight_gradient` (default) runs the weight-gradient products in
  float8 too, through `job/train/float8_matmul.py` (torchao's casts, its own layout handling); without
  it, or for LoRA, the products are torchao float8 training (`convert_to_float8_training`; LoRA: the
  frozen base layers only, the adapters stay float32) with the weight gradient in bf16
  (`_fp8_training_config`). Needs an sm89+ GPU; layers whose sizes are not multiples of 16 stay bf16.
"""

from __future__ import annotations

import functools
import logging

import torch

from job.errors import EnvironmentProblem

log = logging.getLogger("trainer.train")

QUANTISED = ("int8", "fp8")


def check_available(precision: str, setting: str = "model.base_model_precision") -> None:
    """EnvironmentProblem (exit 3) at start when torchao cannot be imported."""
    try:
        import torchao  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a torchao built for another torch fails in several ways
        fallback = "mixed_precision: bf16" if setting == "train.mixed_precision" else "base_model_precision: bf16"
        raise EnvironmentProblem(
            f"{setting} {precision!r} needs torchao, which cannot be imported ({exc.__class__.__name__}: {exc})",
            f"pip install torchao (a version matching your torch), or use {fallback}") from None


def _frozen_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not module.weight.requires_grad


def _float8_sizes(out_features: int, in_features: int) -> bool:
    """Whether a product with this weight shape can run in float8: both sizes divisible by 16."""
    return out_features % 16 == 0 and in_features % 16 == 0


def _fp8_linear(module: torch.nn.Module, fqn: str) -> bool:
    # the blocks hold ~all the FLOPs
    return (isinstance(module, torch.nn.Linear) and ".transformer_blocks." in f".{fqn}."
            and _float8_sizes(module.out_features, module.in_features))


#: Whether torchao's product runs the weight gradient in float8 too (its default tensorwise recipe, the token
#: dimension padded to a multiple of 16). A bench switch: measured slower than bf16 in the compiled step (its
#: padding and transposed copies are separate passes); `speed.fp8_weight_gradient` is the shipped float8 weight
#: gradient, whose products are bit for bit this recipe's (tests/train/test_float8_matmul.py).
FP8_WEIGHT_GRADIENT = False
#: Measured alternatives (`bench/fp8_gemm.py`, `bench/train_step.py`, bench/RESULTS.md), switches for the benches:
#: the output gradient cast to e4m3 instead of e5m2, and a torchao recipe name instead of the configuration below.
FP8_GRADIENT_E4M3 = False
FP8_RECIPE = "tensorwise"


def _fp8_training_config(fast_input_gradient: bool = True):
    """Tensorwise float8 for the forward and the input-gradient products; the weight-gradient product
    in bf16. Its inner size is the token count (81x832x480 gives 32,760 tokens), which float8
    kernels need divisible by 16 and which a training run does not choose; it is also the product
    where float8 costs the most accuracy (torchao's `rowwise_with_gw_hp` recipe makes the same call).
    `fast_input_gradient` (`speed.fp8_fast_accumulation`): cuBLAS's fast accumulation in the input-gradient
    product too (torchao uses it for the forward product only)."""
    from torchao.float8 import CastConfig, Float8GemmConfig, Float8LinearConfig, ScalingType

    if FP8_RECIPE != "tensorwise":
        return Float8LinearConfig.from_recipe_name(FP8_RECIPE)
    extra = {}
    if fast_input_gradient:
        extra["gemm_config_grad_input"] = Float8GemmConfig(use_fast_accum=True)
    grad_dtype = torch.float8_e4m3fn if FP8_GRADIENT_E4M3 else None
    if grad_dtype is not None:
        extra["cast_config_grad_output"] = CastConfig(target_dtype=grad_dtype)
    if FP8_WEIGHT_GRADIENT:
        if grad_dtype is not None:
            extra["cast_config_grad_output_for_grad_weight"] = CastConfig(target_dtype=grad_dtype)
        return Float8LinearConfig(pad_inner_dim=True, **extra)
    return Float8LinearConfig(cast_config_input_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED),
                              cast_config_grad_output_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED,
                                                                                 target_dtype=grad_dtype),
                              **extra)


def _check_fp8_gpu(what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        # preflight says the same; this catches a train phase started without it
        raise EnvironmentProblem(f"{what} needs an sm89+ GPU (Ada, Hopper or newer); {torch.cuda.get_device_name()} is "
                                 "sm{}{}".format(*torch.cuda.get_device_capability()),
                                 "use bf16, or an L4/L40S/RTX 40xx/H100 or newer GPU")


def quantize_base(transformer: torch.nn.Module, spec) -> int:
    """Quantise the frozen base as `model.base_model_precision` says (LoRA; the spec rules refuse int8 / fp8
    for a full fine-tune); returns the number of layers changed (0 for bf16/fp32)."""
    precision = spec.model.base_model_precision
    if precision not in QUANTISED:
        return 0
    check_available(precision)
    if spec.model.type != "lora":
        raise ValueError(f"base_model_precision {precision} is a frozen-base format (LoRA); a full fine-tune trains bf16 or fp32")
    if precision == "fp8":
        _check_fp8_gpu("base_model_precision: fp8")
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    layers = sum(1 for name, m in transformer.named_modules() if _frozen_linear(m, name))
    config = Int8WeightOnlyConfig() if precision == "int8" else Float8WeightOnlyConfig()
    quantize_(transformer, config, filter_fn=_frozen_linear)
    log.info("frozen base quantised to %s (torchao %s): %d linear layers", precision, type(config).__name__, layers)
    return layers


# --------------------------------------------------------------------------- frozen weights, cast once

#: Whether LoRA's frozen weights are cast to float8 once (`FrozenFloat8Weights`). Exact either way (the same cast);
#: a switch for `bench/train_step.py`, which measures both.
CACHE_FROZEN_FLOAT8 = True

#: attribute of a module holding the float8 copies of its frozen weights: {key: (float8 bits, scale)}
FROZEN_FLOAT8_ATTR = "_trainer_frozen_float8"


def _cached_float8_constructor():
    """An autograd function (allowed in compiled graphs, like torchao's own casts) that wraps cached float8 bits
    and their scale as the `Float8TrainingTensor` torchao's matmul takes (so it skips its cast). No gradient:
    only frozen weights are cached."""
    from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole

    @torch._dynamo.allow_in_graph
    class _CachedFloat8Weight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, bits, scale, orig_dtype, linear_mm_config):
            return Float8TrainingTensor(bits, scale, orig_dtype, linear_mm_config=linear_mm_config,
                                        gemm_input_role=GemmInputRole.WEIGHT)

        @staticmethod
        def backward(ctx, grad):
            return None, None, None, None

    return _CachedFloat8Weight


class FrozenFloat8Weights:
    """float8 copies of the frozen weights that the float8 products multiply by (LoRA's base), cast once instead of
    in every forward and backward pass (7 ms of a 0.60 s LoRA step on an H100 for 1.8 GiB, bench/RESULTS.md).

    The copies are exactly what torchao's dynamic tensorwise cast makes of the same weight (the same function
    computes them), so the products are unchanged bit for bit. They live on the modules that use them
    (`FROZEN_FLOAT8_ATTR`), outside the state dict, and are (re)built by `refresh` - a forward pre-hook of the
    transformer, i.e. eagerly, before any compiled block runs - when missing, when the weights moved to another
    device, or when a weight was written in place (its version counter changed)."""

    def __init__(self, config, linear_mm_config):
        self.config, self.linear_mm_config = config, linear_mm_config
        self._entries: list[tuple[torch.nn.Module, str, torch.nn.Parameter, object]] = []
        self._built: dict[tuple[int, str], tuple] = {}

    @staticmethod
    def supported(config) -> bool:
        """One float8 copy serves the forward and the input-gradient product only when both casts of the weight
        are the same dynamic tensorwise e4m3 cast (the recipe `_fp8_training_config` sets)."""
        from torchao.float8 import ScalingGranularity, ScalingType

        fwd, bwd = config.cast_config_weight, config.cast_config_weight_for_grad_input
        return (fwd == bwd and fwd.scaling_type is ScalingType.DYNAMIC
                and fwd.scaling_granularity is ScalingGranularity.TENSORWISE and not config.round_scales_to_power_of_2)

    def add(self, owner: torch.nn.Module, key: str, weight: torch.nn.Parameter, as_matrix=None) -> None:
        """Cache `as_matrix(weight)` (default: the weight itself) for `owner` under `key`."""
        self._entries.append((owner, key, weight, as_matrix))

    def __len__(self) -> int:
        return len(self._entries)

    @torch.no_grad()
    def refresh(self, *_args) -> None:
        from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
        from torchao.float8.float8_training_tensor import GemmInputRole

        cast = self.config.cast_config_weight
        for owner, key, weight, as_matrix in self._entries:
            stamp = (weight.device, weight._version, weight.data_ptr())
            if self._built.get((id(owner), key)) == stamp and key in getattr(owner, FROZEN_FLOAT8_ATTR, {}):
                continue
            matrix = weight if as_matrix is None else as_matrix(weight)
            fp8 = hp_tensor_to_float8_dynamic(matrix, cast.target_dtype, self.linear_mm_config,
                                              gemm_input_role=GemmInputRole.WEIGHT)
            if getattr(owner, FROZEN_FLOAT8_ATTR, None) is None:
                setattr(owner, FROZEN_FLOAT8_ATTR, {})
            getattr(owner, FROZEN_FLOAT8_ATTR)[key] = (fp8._data, fp8._scale)
            self._built[(id(owner), key)] = stamp


def cached_float8(owner: torch.nn.Module, key: str, orig_dtype: torch.dtype, linear_mm_config):
    """The cached float8 copy of `owner`'s weight `key` as a `Float8TrainingTensor`, or None when there is none."""
    cached = getattr(owner, FROZEN_FLOAT8_ATTR, None)
    cached = None if cached is None else cached.get(key)
    if cached is None:
        return None
    return _CACHED_FLOAT8.apply(cached[0], cached[1], orig_dtype, linear_mm_config)


_CACHED_FLOAT8 = None


@functools.cache
def _frozen_float8_linear_class():
    """torchao's `Float8Linear` whose weight comes from the `FrozenFloat8Weights` cache (when built)."""
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args

    class FrozenFloat8Linear(Float8Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled():
                input = input.to(torch.get_autocast_gpu_dtype())
            weight = cached_float8(self, "weight", self.weight.dtype, self.linear_mm_config)
            if weight is None:
                return super().forward(input)
            output = matmul_with_hp_or_float8_args.apply(input, weight.t(), self.linear_mm_config, self.config)
            return output if self.bias is None else output + self.bias.to(output.dtype)

    return FrozenFloat8Linear


class Float8Product:
    """`F.linear(x, weight, bias)` with the product in float8: torchao's float8 training matmul (the autograd
    function `Float8Linear` calls, so the same casts and scaling as the converted linear layers), for
    weights that are not `nn.Linear` modules (the feed-forward's conv weights, used as matrices by the fused
    feed-forward). Products whose sizes are not multiples of 16 run in bf16 through `F.linear`. `owner` and
    `key` name the weight for the frozen-weight cache (`FrozenFloat8Weights`), used when it holds a copy."""

    def __init__(self, config, own_weight_gradient: bool = False):
        from torchao.float8 import LinearMMConfig, ScaledMMConfig
        # torchao's float8 training autograd function (not exported: `Float8Linear.forward` calls it)
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        self._matmul = matmul_with_hp_or_float8_args
        self.config = config
        mm = [ScaledMMConfig(config.emulate, gemm.use_fast_accum, False, config.pad_inner_dim)
              for gemm in (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)]
        self.mm_config = LinearMMConfig(*mm)
        # trained weights through `float8_matmul.float8_linear` (`speed.fp8_weight_gradient`)
        self.own_weight_gradient = own_weight_gradient

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 owner: torch.nn.Module | None = None, key: str | None = None) -> torch.Tensor:
        if not _float8_sizes(weight.shape[0], x.shape[-1]):
            return torch.nn.functional.linear(x, weight, bias)
        if torch.is_autocast_enabled():  # as Float8Linear: the product's inputs in the autocast dtype
            x = x.to(torch.get_autocast_gpu_dtype())
        cached = None if owner is None else cached_float8(owner, key, x.dtype, self.mm_config)
        if self.own_weight_gradient and cached is None and weight.requires_grad:
            from job.train.float8_matmul import float8_linear

            return float8_linear(x, weight, bias, self.mm_config.grad_input.use_fast_accum)
        out = self._matmul.apply(x, (weight.to(x.dtype) if cached is None else cached).t(), self.mm_config, self.config)
        return out if bias is None else out + bias.to(out.dtype)


def enable_fp8_matmuls(transformer: torch.nn.Module, spec) -> int:
    """`train.mixed_precision: fp8`: the blocks' matrix products in float8 (see the module docstring).
    Call after LoRA is added (its adapters must stay float32) and before the blocks are compiled.
    Returns the number of linear layers converted."""
    if spec.train.mixed_precision != "fp8":
        return 0
    check_available("fp8", setting="train.mixed_precision")
    _check_fp8_gpu("train.mixed_precision: fp8")
    from torchao.float8 import convert_to_float8_training

    from job.models.sanavideo.speed import set_feedforward_matmul

    lora = spec.model.type == "lora"

    def convert(module: torch.nn.Module, fqn: str) -> bool:
        return _fp8_linear(module, fqn) and not (lora and module.weight.requires_grad)  # LoRA: not the adapters

    config = _fp8_training_config(spec.speed.fp8_fast_accumulation)
    # a full fine-tune's float8 weight gradients: its products through `float8_matmul` (LoRA trains no base weight)
    own = spec.speed.fp8_weight_gradient and not lora
    layers = sum(1 for name, m in transformer.named_modules() if convert(m, name))
    if layers and own:
        from job.train.float8_matmul import Float8TrainedLinear

        for name, module in list(transformer.named_modules()):
            if convert(module, name):
                module.__class__ = Float8TrainedLinear  # same parameters, float8 products
                module.fast_input_gradient = spec.speed.fp8_fast_accumulation
    elif layers:
        convert_to_float8_training(transformer, config=config, module_filter_fn=convert)
    product = Float8Product(config, own_weight_gradient=own)
    feedforwards = set_feedforward_matmul(transformer, product)
    if not layers:
        log.warning("fp8 matmuls: no linear layer of the transformer blocks has sizes divisible by 16; they stay bf16")
    cached = cache_frozen_float8_weights(transformer, product) if lora else 0
    log.info("fp8 matmuls (torchao float8, dynamic scaling): %d linear layers%s and the feed-forward products of %d blocks "
             "(inside compiled blocks)%s", layers, " (the frozen base; the adapters stay float32)" if lora else "", feedforwards,
             f"; {cached} frozen weights cast to float8 once" if cached else "")
    if not spec.speed.compile_blocks:
        log.warning("train.mixed_precision fp8 without speed.compile_blocks: the feed-forward stays bf16 and the float8 "
                    "casts run as separate kernels, which made eager steps slower than bf16 (bench/RESULTS.md); "
                    "turn speed.compile_blocks on, or use mixed_precision: bf16")
    return layers


#: the transformer attribute holding its `FrozenFloat8Weights` (tests and benches read it)
FROZEN_FLOAT8_CACHE_ATTR = "_trainer_frozen_float8_cache"


def cache_frozen_float8_weights(transformer: torch.nn.Module, product: Float8Product) -> int:
    """LoRA with float8 products: cast the frozen weights the products use to float8 once (`FrozenFloat8Weights`):
    the converted base linears and the fused feed-forwards' conv matrices. Returns how many weights are cached
    (0 when the recipe does not allow one copy for both products)."""
    global _CACHED_FLOAT8
    if not (CACHE_FROZEN_FLOAT8 and FrozenFloat8Weights.supported(product.config)):
        return 0
    from torchao.float8.float8_linear import Float8Linear

    from job.models.sanavideo.speed import feedforward_matrices

    if _CACHED_FLOAT8 is None:
        _CACHED_FLOAT8 = _cached_float8_constructor()
    frozen_linear = _frozen_float8_linear_class()
    cache = FrozenFloat8Weights(product.config, product.mm_config)
    for module in transformer.modules():
        if type(module) is Float8Linear and not module.weight.requires_grad:
            module.__class__ = frozen_linear  # same state, forward reads the cache
            cache.add(module, "weight", module.weight)
    for ff, key, weight, as_matrix in feedforward_matrices(transformer):
        if not weight.requires_grad and _float8_sizes(*as_matrix(weight.detach()).shape):
            cache.add(ff, key, weight, as_matrix)
    if len(cache):
        setattr(transformer, FROZEN_FLOAT8_CACHE_ATTR, cache)
        transformer.register_forward_pre_hook(cache.refresh)
    return len(cache)
