"""The ops' size limits, defined once for the Python package. The C++ and CUDA code define the
same numbers once, in csrc/op_limits.h, and expose them as attnkern._C.MAX_HEAD_DIM / MAX_UNITS;
tests/test_contract.py checks that the two agree."""

# attention_pool: 1 <= Dk, Dv <= MAX_HEAD_DIM.
MAX_HEAD_DIM = 256
# activation_unit_pool: 1 <= E, Dv and every hidden layer's units <= MAX_UNITS.
MAX_UNITS = 256
