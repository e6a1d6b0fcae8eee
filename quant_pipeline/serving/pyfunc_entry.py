"""Models-from-code entry point: MLflow copies this file into every registered version and runs it on load.

Registration names this file by path (`release.reference.PYFUNC_CODE`), so the release layer never
imports serving; loading imports the serving package, which is installed wherever a version is served.
"""

from mlflow.models import set_model

from quant_pipeline.serving.pyfunc import QuantizedLLM

set_model(QuantizedLLM())
