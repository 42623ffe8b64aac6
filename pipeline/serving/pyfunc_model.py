"""The MLflow pyfunc model of a task's classifier, logged as code (no pickled objects).

MLflow imports this file when it loads a model version; ``pipeline`` travels with the model
as its code path.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipeline.serving.model import RecallClassifierModel


class RecallPyfunc(PythonModel):
    def load_context(self, context):
        self.model = RecallClassifierModel(context.artifacts["classifier"])

    # A DataFrame hint: MLflow accepts it without inferring a schema from it (the logged
    # signature stays the one checked), and stops warning on every load that hints are missing.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.model.predict_frame(model_input)


mlflow.models.set_model(RecallPyfunc())
