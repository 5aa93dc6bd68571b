"""Built-in generated models (``demo``, ``bench``): real CTranslate2 models, random weights."""
