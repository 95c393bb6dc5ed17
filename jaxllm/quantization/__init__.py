"""Quantized weights: GGUF blocks kept as they are, or int8 weight-only, and the one
``quantized_matmul`` every projection runs on them (``weight``; formats in ``ggml``; loading
in ``gguf_params`` and ``int8_params``). ``Engine(quantization=...)`` picks the method."""

from jaxllm.quantization.weight import (INT8, QTYPES, QuantizedWeight, dequantize,
                                        embedding_lookup, is_quantized, matmul_implementation,
                                        packed_by_default,
                                        quantize_int8, quantized_matmul,
                                        reference_quantized_matmul, use_int_dot)

__all__ = ["INT8", "QTYPES", "QuantizedWeight", "dequantize", "embedding_lookup", "is_quantized",
           "matmul_implementation", "packed_by_default", "quantize_int8", "quantized_matmul",
           "reference_quantized_matmul", "use_int_dot"]
