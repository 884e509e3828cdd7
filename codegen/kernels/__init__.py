"""QPU kernel generators written with the assembler DSL.

Importing this package registers the operator kernels with :mod:`tvm_qpu.codegen.registry`
(each operator module does so on import). :mod:`.calibration` holds the copy and naive SGEMM
kernels the emulator's timing model is calibrated on; they are not registered operators.
"""

from . import gemm  # noqa: E402,F401  (matmul)
from . import conv  # noqa: E402,F401  (conv2d)
from . import softmax  # noqa: E402,F401  (softmax)
from . import attention  # noqa: E402,F401  (attention)
from . import reduce  # noqa: E402,F401  (reduce_max, reduce_min)
from . import pool  # noqa: E402,F401  (max_pool2d, avg_pool2d, global_avg_pool2d)
from . import elementwise  # noqa: E402,F401  (add, gelu)
from . import layernorm  # noqa: E402,F401  (layer_norm)
