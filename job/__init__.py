"""trainer: fine-tune SANA-Video 2B 480p from one declarative YAML job spec."""

import logging as _logging

__version__ = "0.1.0"

# torchao (the int8/fp8 base) is imported by diffusers whenever it is installed. Its optional C++
# kernels are built for one torch/Python pair; elsewhere it, diffusers and torch's pytree each log a
# harmless warning on every start, before our logging is set up. The paths we use (weight-only int8,
# float8 training) need none of those kernels, so the noise is quieted here, the first import of any run.
for _name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
