"""The MLflow pyfunc class of a run's model (see :mod:`clipexp.serving.logged_model`); the inference is :mod:`clipexp.serving.inference`."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import mlflow.pyfunc

ARTIFACT = "clip"  # the save_pretrained folder (+ clipexp_inference.json) among the model's artifacts


class CLIPPyfuncModel(mlflow.pyfunc.PythonModel):
    """``predict(df, params={"task": ..., "head": ..., "alpha": ...})`` over :class:`clipexp.serving.inference.CLIPInference`.
    ``CLIPEXP_DEVICE`` (default auto) and ``CLIPEXP_BATCH_SIZE`` choose where and how it encodes; images are
    bytes (base64), never server paths, within the limits of :mod:`clipexp.serving.policy` (``CLIPEXP_MAX_*``)."""

    # the signature is given when the model is logged (clipexp.serving.logged_model), not read from type hints: this
    # keeps MLflow from wrapping predict for them and from warning "Add type hints" wherever this module is imported
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from clipexp.serving.inference import CLIPInference, InferenceSpec
        from clipexp.serving.policy import ServedSources, ServeLimits

        batch = os.environ.get("CLIPEXP_BATCH_SIZE")
        limits = ServeLimits.from_env()
        spec = InferenceSpec.load(context.artifacts[ARTIFACT])
        self.sources = ServedSources(limits, file_root=spec.serve_file_root if spec is not None else None)
        self.inference = CLIPInference.from_pretrained(context.artifacts[ARTIFACT], device=os.environ.get("CLIPEXP_DEVICE", "auto"),
                                                       batch_size=int(batch) if batch else None, read_source=self.sources,
                                                       max_pixels=limits.max_image_pixels)

    def predict(self, context, model_input, params: Optional[Dict[str, Any]] = None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from clipexp.serving.inference import InferenceError, answer_frame

        try:
            self.sources.check_request(model_input)
            params = params or {}
            return answer_frame(self.inference, model_input, params.get("task") or "zero_shot", params.get("head"), params.get("alpha"))
        except InferenceError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
