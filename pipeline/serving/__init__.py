"""A task's classifier as a servable MLflow pyfunc model: what a version holds, how it
predicts, and how it is logged with only the code serving needs.
"""
