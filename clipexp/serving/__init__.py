"""Using a fine-tuned model: batch inference (:mod:`~clipexp.serving.inference`), the ``predict`` command
(:mod:`~clipexp.serving.predict`), and the MLflow pyfunc model that ``mlflow models serve`` serves
(:mod:`~clipexp.serving.pyfunc`, logged by :mod:`~clipexp.serving.logged_model`)."""
