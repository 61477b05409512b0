"""Every numerical tolerance of the project, in one place. Tests, the CLI and reports read them from
here; none is loosened to make a test pass without a reason written beside it."""

# Op level: reference vs transformers vs onnxruntime, fp32 (custom-op issue).
OP_FP32_RTOL = 1e-5
OP_FP32_ATOL = 1e-5

# Text export, fp32 package vs transformers (text-export issue "Done when").
TEXT_FP32_MAX_ABS_LOGIT_DIFF = 1e-3
TEXT_FP32_KL_MEAN = 1e-6
BLOCK_FP32_MIN_COSINE = 0.99999

# Published parameter figures are rounded to two significant digits.
PUBLISHED_PARAMS_RELATIVE = 0.02

# Quantization quality gates on the trained fixtures, against the float package (quantization issue).
QUANT_GATES = {
    "int8": {"kl_mean": 0.0005, "top1_agreement": 0.995},
    "int4": {"kl_mean": 0.005, "top1_agreement": 0.975, "bits_per_byte_increase": 0.004,
             "avg_bits_per_linear_weight": 4.9},
}

# Vision and audio towers, fp32 package vs transformers (multimodal issue "Done when"): soft tokens compared as
# max |a − b| / max |a| over every valid soft token; int8 towers by cosine.
SOFT_TOKEN_FP32_RELATIVE = 1e-4
SOFT_TOKEN_INT8_MIN_COSINE = 0.999
MULTIMODAL_GREEDY_STEPS = 32

# Geometry sweep (tests/test_geometry_sweep.py): quantized vs float package, mean cosine of the logits over 64
# tokens, on tiny random models of odd widths. Not a quality gate (random weights at widths of 24-96 lose far
# more to int4 than trained models): it catches a quantized tensor laid out wrongly (the embedding's padded rows
# sliced 8 columns off measured 0.07). Measured: int8 ≥ 0.999, int4 recipes ≥ 0.93 (hidden 24).
SWEEP_QUANT_MIN_LOGIT_COSINE = {"int8": 0.99, "int4": 0.8}
