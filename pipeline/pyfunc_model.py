"""The MLflow pyfunc model of a task's classifier, logged as code (no pickled objects).

MLflow imports this file when it loads a model version; ``pipeline`` travels with the model
as its code path.
"""

import mlflow
from mlflow.pyfunc import PythonModel

from pipeline.serving import RecallClassifierModel


class RecallPyfunc(PythonModel):
    def load_context(self, context):
        self.model = RecallClassifierModel(context.artifacts["classifier"])

    def predict(self, context, model_input, params=None):
        return self.model.predict_frame(model_input)


mlflow.models.set_model(RecallPyfunc())
