"""quant_pipeline: LLM quantization as an audited model-release event."""

import logging

# bitsandbytes 0.50 warns on import, on CPUs with AVX-512-BF16, that it could not fetch a 4-bit kernel from
# the Hugging Face hub (through the `kernels` package). Fetching code from a hub at run time is what this
# project rules out; bitsandbytes then runs its own CPU kernel, which is the one the audit measures (and the
# runtime fingerprint records). Only that message is dropped; the logger's other warnings still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)
