"""quant_pipeline: LLM quantization as an audited model-release event."""
